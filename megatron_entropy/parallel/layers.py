"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

With a single-rank ParallelState they are plain nn.Linear / nn.Embedding.

The linear layers optionally reparameterise their weight with weight normalisation (per output
unit) or spectral normalisation (of the *full* matrix), the paper's LayerNorm alternatives. Both
stay exact under sharding:
  * column-parallel (output units split): a unit's norm is local; sigma = u^T W v is a sum of
    per-shard partials, all-reduced with a backward all-reduce because each rank then uses it in
    its own shard's computation;
  * row-parallel (input features split): the per-unit norms and sigma are sums over shards, and
    the scale g/||v|| or 1/sigma is applied *after* the output all-reduce, where everything is
    replicated, so gradients need no further reduction.
Each parameter and sharded buffer records its `partition_dim` (None: replicated) for
checkpoint resharding and for gathering gradients in tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_entropy.parallel.mappings import (
    all_reduce_no_grad,
    all_reduce_partials,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from megatron_entropy.parallel.random import normal_init, param_generator
from megatron_entropy.parallel.recompute import is_recomputing
from megatron_entropy.parallel.state import ParallelState

NORMALIZATIONS = ("none", "weight_norm", "spectral_norm")
SPECTRAL_INIT_ITERATIONS = 15  # as torch.nn.utils.parametrizations.spectral_norm


def _shard(full: torch.Tensor, dim: int | None, state: ParallelState) -> torch.Tensor:
    if dim is None or state.tp_size == 1:
        return full.clone()
    return full.chunk(state.tp_size, dim=dim)[state.tp_rank].clone()


def _param(tensor: torch.Tensor, partition_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(tensor)
    p.partition_dim = partition_dim
    return p


class _ParallelLinear(nn.Module):
    """Shared machinery; `split_dim` is 0 for column- and 1 for row-parallel weights."""

    split_dim: int

    def __init__(self, in_features, out_features, *, state, bias, normalization, init_std, seed, name,
                 init_rows=None):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        split_size = out_features if self.split_dim == 0 else in_features
        if split_size % state.tp_size:
            raise ValueError(f"{name}: dimension {split_size} is not divisible by tensor-parallel size {state.tp_size}")
        self.state, self.normalization = state, normalization
        self.in_features, self.out_features = in_features, out_features
        full = normal_init((out_features, in_features), init_std, seed, name, valid_rows=init_rows)
        self.weight = _param(_shard(full, self.split_dim, state), self.split_dim)
        self.bias = None
        if bias:
            self.bias = _param(_shard(torch.zeros(out_features), 0 if self.split_dim == 0 else None, state),
                               0 if self.split_dim == 0 else None)
        self.buffer_partition_dims: dict[str, int | None] = {}
        if normalization == "weight_norm":
            # g starts at each unit's initial norm, so the layer starts as the plain one (A8).
            g = full.norm(dim=1)
            g_dim = 0 if self.split_dim == 0 else None
            self.weight_g = _param(_shard(g, g_dim, state), g_dim)
        elif normalization == "spectral_norm":
            gen = param_generator(seed, name + ".u")
            u = F.normalize(torch.randn(out_features, generator=gen), dim=0)
            v = F.normalize(torch.randn(in_features, generator=gen), dim=0)
            u_dim, v_dim = (0, None) if self.split_dim == 0 else (None, 0)
            self.register_buffer("spectral_u", _shard(u, u_dim, state))
            self.register_buffer("spectral_v", _shard(v, v_dim, state))
            self.register_buffer("spectral_ready", torch.zeros((), dtype=torch.bool))
            self.buffer_partition_dims = {"spectral_u": u_dim, "spectral_v": v_dim, "spectral_ready": None}

    # --- spectral norm -------------------------------------------------------------------------
    @torch.no_grad()
    def _power_iteration(self, iterations: int) -> None:
        """Update u, v towards the top singular vectors of the full (unsharded) matrix."""
        group, w = self.state.tp_group, self.weight.detach().float()
        u, v = self.spectral_u.float(), self.spectral_v.float()
        column = self.split_dim == 0  # u sharded (rows), v replicated; else the reverse
        for _ in range(iterations):  # u first, then v: the order of torch's spectral_norm
            u = w @ v
            if not column:
                all_reduce_no_grad(u, group)
            u = u / _global_norm(u, group if column else None)
            v = w.t() @ u
            if column:
                all_reduce_no_grad(v, group)
            v = v / _global_norm(v, None if column else group)
        self.spectral_u.copy_(u)
        self.spectral_v.copy_(v)

    def _sigma(self) -> torch.Tensor:
        # Not again while an activation checkpoint recomputes this forward (parallel/recompute.py).
        if (self.training and not is_recomputing()) or not bool(self.spectral_ready):
            self._power_iteration(1 if bool(self.spectral_ready) else SPECTRAL_INIT_ITERATIONS)
            self.spectral_ready.fill_(True)
        # Clones, as torch's spectral_norm does: autograd saves u and v, and the next forward's
        # power iteration updates the buffers in place (pipeline schedules run several forwards
        # before their backwards).
        u, v = self.spectral_u.clone(), self.spectral_v.clone()
        return torch.dot(u, self.weight @ v)  # this shard's partial of sigma = u^T W v

    # --- weight norm ---------------------------------------------------------------------------
    def _row_sq_norms(self) -> torch.Tensor:
        return (self.weight.float() ** 2).sum(dim=1)


def _global_norm(x: torch.Tensor, group) -> torch.Tensor:
    sq = (x * x).sum()
    all_reduce_no_grad(sq, group)
    return sq.sqrt().clamp_min(1e-12)


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's output units split over TP ranks; y stays sharded unless gathered."""

    split_dim = 0

    def __init__(self, in_features, out_features, *, state: ParallelState, bias=False,
                 gather_output=False, copy_input=True, normalization="none", init_std=0.02,
                 seed=0, name="column", init_rows=None):
        """init_rows: only the first init_rows output units are drawn, the rest (padding) are zero."""
        super().__init__(in_features, out_features, state=state, bias=bias,
                         normalization=normalization, init_std=init_std, seed=seed, name=name,
                         init_rows=init_rows)
        self.gather_output, self.copy_input = gather_output, copy_input

    def effective_weight(self) -> torch.Tensor:
        if self.normalization == "weight_norm":
            scale = self.weight_g / self._row_sq_norms().sqrt().clamp_min(1e-12)
            return self.weight * scale.to(self.weight.dtype)[:, None]
        if self.normalization == "spectral_norm":
            sigma = all_reduce_partials(self._sigma(), self.state.tp_group)
            return self.weight / sigma
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp_region(x, self.state.tp_group)
        y = F.linear(x, self.effective_weight(), self.bias)
        return gather_from_tp_region(y, self.state.tp_group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's input features split; partial products are all-reduced."""

    split_dim = 1

    def __init__(self, in_features, out_features, *, state: ParallelState, bias=False,
                 input_is_parallel=True, normalization="none", init_std=0.02, seed=0, name="row"):
        super().__init__(in_features, out_features, state=state, bias=bias,
                         normalization=normalization, init_std=init_std, seed=seed, name=name)
        self.input_is_parallel = input_is_parallel

    def output_scale(self) -> torch.Tensor | None:
        """The normalisation factor, applied after the all-reduce (replicated there)."""
        group = self.state.tp_group
        if self.normalization == "weight_norm":
            norms = reduce_from_tp_region(self._row_sq_norms(), group).sqrt().clamp_min(1e-12)
            return self.weight_g / norms
        if self.normalization == "spectral_norm":
            return 1.0 / reduce_from_tp_region(self._sigma(), group)
        return None

    def effective_weight(self) -> torch.Tensor:
        """The full-layer weight of this shard, as a plain linear layer would hold it."""
        scale = self.output_scale()
        return self.weight if scale is None else self.weight * scale.to(self.weight.dtype).reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.state.tp_group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.state.tp_group)
        scale = self.output_scale()
        if scale is not None:
            y = y * scale.to(y.dtype)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over TP ranks; the output is replicated."""

    def __init__(self, num_embeddings: int, dim: int, *, state: ParallelState, init_std=0.02, seed=0,
                 name="embedding", init_rows: int | None = None):
        """init_rows: the true vocabulary size; rows beyond it (padding) start at zero."""
        super().__init__()
        if num_embeddings % state.tp_size:
            raise ValueError(f"padded vocabulary {num_embeddings} is not divisible by tensor-parallel size {state.tp_size}")
        self.state, self.num_embeddings = state, num_embeddings
        per_rank = num_embeddings // state.tp_size
        self.vocab_start, self.vocab_end = state.tp_rank * per_rank, (state.tp_rank + 1) * per_rank
        full = normal_init((num_embeddings, dim), init_std, seed, name, valid_rows=init_rows)
        self.weight = _param(_shard(full, 0, state), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp_region(out, self.state.tp_group)
