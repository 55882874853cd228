"""Seeding that does not depend on the parallel layout.

Every parameter is initialised from its own generator, seeded by (seed, parameter name), at its
full (unsharded) shape and then sliced. So a model built under any TP/PP layout from one seed holds
exactly the weights of the single-process model, sharded — which is what makes the layout
equivalence tests meaningful and lets checkpoints move between layouts.
"""

from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import torch


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator private to one named parameter (crc32 keeps it stable across runs)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def normal_init(shape, std: float, seed: int, name: str, valid_rows: int | None = None) -> torch.Tensor:
    """N(0, std) at `shape` from the parameter's own generator.

    With `valid_rows` only the first rows are drawn and the rest (vocabulary padding) are zero.
    The padded size depends on the TP size, and drawing at the padded shape would not even keep
    the real rows layout-independent: torch's CPU normal_ redraws the last 16 values when the
    element count is not a multiple of 16.
    """
    shape = tuple(shape)
    if valid_rows is None or valid_rows >= shape[0]:
        return torch.empty(shape).normal_(0.0, std, generator=param_generator(seed, name))
    full = torch.zeros(shape)
    full[:valid_rows].normal_(0.0, std, generator=param_generator(seed, name))
    return full


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch; identical on every rank (data order has its own seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TensorParallelRNG:
    """A second RNG stream that differs between tensor-parallel ranks.

    Randomness applied to *sharded* activations (e.g. dropout inside a TP region) must differ
    per shard, while randomness on replicated activations must agree across TP ranks and so uses
    the default generator. Megatron offsets the TP stream by 2718 + tp_rank; we do the same.
    """

    def __init__(self, seed: int, tp_rank: int):
        self.generator = torch.Generator().manual_seed(seed + 2718 + tp_rank)

    @contextlib.contextmanager
    def fork(self):
        """Run the body with the default CPU RNG swapped for the TP stream."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self.generator.get_state())
        try:
            yield
        finally:
            self.generator.set_state(torch.get_rng_state())
            torch.set_rng_state(saved)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
