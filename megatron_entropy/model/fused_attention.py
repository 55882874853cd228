"""Blocked (flash-style) attention that also returns the Shannon entropy of every attention row.

The model's "fused" attention core calls `fused_entropy_attention`. It returns exactly what the
eager core returns -- (context, entropy) with entropy_i = -sum_j p_ij log p_ij in fp32 -- but never
builds the T x T probability matrix: it walks query blocks x key blocks with an online softmax and
keeps only O(T) per-row statistics. Backward recomputes the probabilities block by block from the
saved log-sum-exp. On CUDA with Triton available the same maths runs as Triton kernels
(`triton_attention.py`); everywhere else the pure-PyTorch `BlockedEntropyAttention` below is used.
The maths and the measured numbers are in docs/fused_attention.md.

Notation (per batch*head, per query row i): s_ij = q_i . k_j (q already carries every scale),
m_i running max, l_i = sum_j exp(s_ij - m_i), a_i = sum_j exp(s_ij - m_i) (s_ij - m_i),
lse_i = m_i + log l_i, H_i = log l_i - a_i / l_i, O_i = sum_j exp(s_ij - m_i) v_j / l_i.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fused_entropy_attention", "blocked_entropy_attention", "BlockedEntropyAttention"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_entropy_attention(q, k, v, causal: bool = True, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [batch, heads, T, head_dim] (any float dtype; q,k,v same dtype).
    q ALREADY carries every logit scale (1/sqrt(d_k) and the per-head, per-position learnable
    temperature 1/t[h,i]), so scores s_ij = q_i . k_j exactly, no further scaling.
    Returns (context [b,h,T,d] in q's dtype, entropy [b,h,T] float32) where
    entropy_i = -sum_j p_ij log p_ij over the (causally) allowed keys, p = softmax(s_i).
    Differentiable in q, k, v through BOTH outputs (the loss may depend on context and on entropy).

    On CUDA the Triton kernels are used when triton imports (their block sizes are their own, so
    `block_size` only applies to the PyTorch path); otherwise the blocked PyTorch path."""
    _check_inputs(q, k, v)
    if q.is_cuda and q.shape[-1] <= 128 and q.dtype in _TRITON_DTYPES:
        try:  # lazy: machines without triton (or without a GPU) never import it
            from megatron_entropy.model.triton_attention import triton_entropy_attention
        except ImportError:
            pass
        else:
            return triton_entropy_attention(q, k, v, causal=causal)
    return blocked_entropy_attention(q, k, v, causal=causal, block_size=block_size)


def blocked_entropy_attention(q, k, v, causal: bool = True, block_size: int = 128):
    """The device-independent PyTorch implementation (same contract as `fused_entropy_attention`;
    float64 inputs are the one exception: computed, and their entropy returned, in float64)."""
    _check_inputs(q, k, v)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return BlockedEntropyAttention.apply(q, k, v, bool(causal), int(block_size))


def _check_inputs(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, heads, T, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16; float64 input stays float64 (exact checks, gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, h, T, d] -> contiguous [b*h, T, d] in the accumulation dtype: one batched-matmul batch
    dimension (a no-op for contiguous fp32 input)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).to(dtype).contiguous()


def _blocks(T: int, block_size: int):
    return [(start, min(start + block_size, T)) for start in range(0, T, block_size)]


def _causal_keep(i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
    """[i1-i0, j1-j0] bool mask of allowed (query, key) pairs, or None when the whole tile is allowed.
    Only tiles that straddle the diagonal need one; tiles fully above it are never visited."""
    if j1 - 1 <= i0:
        return None
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return rows >= cols


def _key_blocks(i1: int, T: int, block_size: int, causal: bool):
    """Key blocks a query block ending at i1 has to visit: all of them, or (causal) those starting
    before i1. The first one always contains key 0, which every causal row may see, so the running
    max is finite after the first tile."""
    return _blocks(i1 if causal else T, block_size)


class BlockedEntropyAttention(torch.autograd.Function):
    """Online-softmax attention + row entropy; saves q, k, v, the output, lse and entropy only."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, block_size: int):
        b, h, T, d = q.shape
        acc_dtype = _acc_dtype(q.dtype)
        qf, kf, vf = (_flat(x, acc_dtype) for x in (q, k, v))
        out = torch.empty_like(qf)
        lse = torch.empty(qf.shape[:2], dtype=acc_dtype, device=q.device)
        ent = torch.empty_like(lse)

        for i0, i1 in _blocks(T, block_size):
            qb = qf[:, i0:i1]
            m = l = a = acc = None
            for j0, j1 in _key_blocks(i1, T, block_size, causal):
                s = torch.bmm(qb, kf[:, j0:j1].transpose(1, 2))  # [B, bq, bk]
                keep = _causal_keep(i0, i1, j0, j1, q.device) if causal else None
                if keep is not None:
                    s.masked_fill_(~keep, -math.inf)
                m_blk = s.amax(-1, keepdim=True)
                m_new = m_blk if m is None else torch.maximum(m, m_blk)
                x = s.sub_(m_new)  # s - m_new, in place: s itself is not needed any more
                p = x.exp()
                if keep is not None:
                    x.masked_fill_(~keep, 0.0)  # masked: p = 0 but x = -inf; 0 * -inf would be NaN
                pv = torch.bmm(p, vf[:, j0:j1])
                l_blk = p.sum(-1, keepdim=True)
                a_blk = (p * x).sum(-1, keepdim=True)
                if m is None:
                    l, a, acc = l_blk, a_blk, pv
                else:
                    # Move the running sums to the new max. a is kept relative to the max
                    # (sum p~ (s - m)) so that H = log l - a / l has no cancellation even when the
                    # logits are huge (small temperatures): both terms are >= 0.
                    shift = m - m_new  # <= 0
                    scale = shift.exp()
                    a = (a + l * shift).mul_(scale).add_(a_blk)
                    l = l.mul_(scale).add_(l_blk)
                    acc = acc.mul_(scale).add_(pv)
                m = m_new
            log_l = l.log()
            lse[:, i0:i1] = (m + log_l).squeeze(-1)
            ent[:, i0:i1] = (log_l - a / l).squeeze(-1)
            out[:, i0:i1] = acc / l

        context = out.view(b, h, T, d).to(q.dtype)
        # Backward needs rowsum(dO * O) in fp32; for fp32 input `context` is that very tensor,
        # for bf16/fp16 the fp32 output is kept (O(T d), negligible next to T^2) so D is exact.
        out_saved = context if q.dtype == acc_dtype else out
        ctx.save_for_backward(q, k, v, out_saved, lse, ent)
        ctx.causal, ctx.block_size = causal, block_size
        ctx.set_materialize_grads(False)  # an unused output gets None: skip its term
        entropy = ent.view(b, h, T)
        return context, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, d_context, d_entropy):
        q, k, v, out, lse, ent = ctx.saved_tensors
        causal, block_size = ctx.causal, ctx.block_size
        b, h, T, d = q.shape
        if d_context is None and d_entropy is None:
            return None, None, None, None, None
        acc_dtype = _acc_dtype(q.dtype)
        qf, kf, vf = (_flat(x, acc_dtype) for x in (q, k, v))
        blocks = _blocks(T, block_size)
        # One contiguous accumulator per key block: an in-place baddbmm_ into a strided slice of a
        # [B, T, d] buffer falls back to one addmm per batch entry (measured ~2x slower overall).
        dk = [qf.new_zeros(qf.shape[0], j1 - j0, d) for j0, j1 in blocks]
        dv = [qf.new_zeros(qf.shape[0], j1 - j0, d) for j0, j1 in blocks]
        dq = []
        lse = lse.unsqueeze(-1)  # [B, T, 1]
        ent = ent.unsqueeze(-1)

        # ds_ij = p_ij (dP_ij - D_i) - dH_i p_ij (log p_ij + H_i),  log p_ij = s_ij - lse_i,
        # dP = dO v^T, D_i = sum_j p_ij dP_ij = dO_i . O_i. Collect the per-row constants once:
        # ds = p * (dP - c - dH * log p) with c = D + dH * H.
        if d_context is not None:
            do = _flat(d_context, acc_dtype)
            c = (do * _flat(out, acc_dtype)).sum(-1, keepdim=True)
        else:
            do, c = None, torch.zeros_like(lse)
        dh = d_entropy.reshape(-1, T, 1).to(acc_dtype) if d_entropy is not None else None
        if dh is not None:
            c = c + dh * ent

        for i0, i1 in blocks:
            qb, lse_b, c_b = qf[:, i0:i1], lse[:, i0:i1], c[:, i0:i1]
            do_b = do[:, i0:i1] if do is not None else None
            dh_b = dh[:, i0:i1] if dh is not None else None
            dq_b = torch.zeros_like(qb)
            for j0, j1 in _key_blocks(i1, T, block_size, causal):
                kb, vb = kf[:, j0:j1], vf[:, j0:j1]
                logp = torch.bmm(qb, kb.transpose(1, 2)).sub_(lse_b)
                keep = _causal_keep(i0, i1, j0, j1, q.device) if causal else None
                if keep is not None:
                    logp.masked_fill_(~keep, -math.inf)
                p = logp.exp()
                if keep is not None:
                    logp.masked_fill_(~keep, 0.0)  # p = 0 there; avoid 0 * -inf below
                if do_b is not None:
                    dv[j0 // block_size].baddbmm_(p.transpose(1, 2), do_b)
                    t = torch.bmm(do_b, vb.transpose(1, 2)).sub_(c_b)  # dP - c
                else:
                    t = (-c_b).expand_as(p).clone()
                if dh_b is not None:
                    t.addcmul_(logp, dh_b, value=-1.0)  # - dH * log p
                ds = t.mul_(p)
                dq_b.baddbmm_(ds, kb)
                dk[j0 // block_size].baddbmm_(ds.transpose(1, 2), qb)
            dq.append(dq_b)

        shape = (b, h, T, d)
        dq = torch.cat(dq, 1).view(shape).to(q.dtype)
        dk = torch.cat(dk, 1).view(shape).to(k.dtype)
        dv = torch.cat(dv, 1).view(shape).to(v.dtype)
        return dq, dk, dv, None, None
