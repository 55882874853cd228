"""Autograd-aware collectives over the tensor-parallel group (Megatron's mappings).

Each maps a forward collective to its adjoint in backward:
    copy_to_tp_region       forward identity       backward all-reduce
    reduce_from_tp_region   forward all-reduce     backward identity
    scatter_to_tp_region    forward split last dim backward all-gather
    gather_from_tp_region   forward all-gather     backward split
    all_reduce_partials     forward all-reduce     backward all-reduce
The last one is for a value that is a sum of per-rank partials and is then used by each rank in
a rank-specific computation (so the gradient reaching each rank is itself a partial); the
spectral norm sigma of a column-sharded matrix is the example.
With group None (one rank) every mapping is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _AllReducePartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def copy_to_tp_region(x, group):
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x, group):
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x, group):
    return x if _size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tp_region(x, group):
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group)


def all_reduce_partials(x, group):
    return x if _size(group) == 1 else _AllReducePartials.apply(x, group)


def all_reduce_no_grad(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (power iterations, statistics)."""
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
