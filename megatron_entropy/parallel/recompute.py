"""Activation recomputation (checkpointing) that keeps a layer's forward side effects single.

`checkpoint(module, fn, *args)` runs `fn` under torch.utils.checkpoint (non-reentrant, RNG state
preserved): the activations inside are dropped after the forward and recomputed in the backward.
Our layers have side effects in a training-mode forward — the spectral-norm power iteration
updates the buffers u, v, and the entropy statistics accumulate — which a recompute must not
repeat. And under pipeline parallelism (1F1B) a stage runs the forwards of later micro-batches
before an earlier one's backward, so by the time a micro-batch is recomputed the buffers have
moved on. Hence, during a recompute:
  * `is_recomputing()` is True: the power iteration and the statistics are skipped;
  * the module's buffers hold the values the original forward ended with (what it used), and
    get their current values back afterwards.
So the recomputed activations, and therefore the gradients, are bit-identical to a run without
checkpointing. (TensorParallelRNG streams are not saved: no layer draws from them yet; a layer
that does must have its tracker state saved here too, as Megatron's CheckpointFunction does.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

_depth = 0


def is_recomputing() -> bool:
    """True while a checkpointed forward is being re-run for its backward."""
    return _depth > 0


@contextlib.contextmanager
def recomputing():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


@torch.no_grad()
def _copy_into(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for b, v in zip(buffers, values):
        b.copy_(v)


def checkpoint(module: torch.nn.Module, function, *args):
    """function(*args) with its activations recomputed in the backward (see the module doc)."""
    calls, used = [0], []

    def run(*inputs):
        calls[0] += 1
        buffers = list(module.buffers())
        if calls[0] == 1:  # the original forward
            out = function(*inputs)
            used[:] = [b.detach().clone() for b in buffers]
            return out
        current = [b.detach().clone() for b in buffers]
        _copy_into(buffers, used)
        try:
            with recomputing():
                return function(*inputs)
        finally:
            _copy_into(buffers, current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
