"""Triton kernels for attention + per-row Shannon entropy (the GPU path of `fused_entropy_attention`).

Same contract and maths as `fused_attention.py` (see docs/fused_attention.md):
  forward   one program per (query block, batch*head): online softmax over key blocks, carrying
            m (running max), l = sum exp(s - m), a = sum exp(s - m) (s - m) and the context;
            writes O, lse = m + log l and H = log l - a / l.
  backward  FlashAttention-2 split, no atomics: one kernel per key block accumulates dK, dV over
            the query blocks that see it; one kernel per query block accumulates dQ. Both
            recompute p = exp(s - lse) and use ds = p * (dP - c - dH * log p), c = D + dH * H,
            D = rowsum(dO * O).
Inputs are fp16/bf16/fp32 with fp32 accumulation; fp32 dots run in IEEE fp32 (no TF32) so that the
fp32 path matches the reference to fp32 rounding. Any T (the tail block is masked) and any
head_dim <= 128 (padded to a power of two >= 16 in registers, masked on load/store).

This module imports triton at the top: import it lazily (fused_attention does) on machines that
may lack triton. Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (slow; tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_entropy_attention", "TritonEntropyAttention"]


@triton.jit
def _tile_scores(q, k, rows, cols, T, CAUSAL: tl.constexpr):
    """s = q k^T for one tile and keep = which (query, key) pairs are real and allowed."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    keep = (rows[:, None] < T) & (cols[None, :] < T)
    if CAUSAL:
        keep = keep & (rows[:, None] >= cols[None, :])
    return s, keep


@triton.jit
def _load_rows(ptr, base, idx, T, D, offs_d, d_ok):
    """[len(idx), BLOCK_D] tile of a [*, T, D] tensor; rows >= T and columns >= D read as 0."""
    return tl.load(ptr + base + idx[:, None] * D + offs_d[None, :],
                   mask=(idx[:, None] < T) & d_ok[None, :], other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, ENT, T, D, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * T * D  # [batch*heads, T, D] contiguous
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(Q, base, rows, T, D, offs_d, d_ok)

    # A finite "minus infinity" start: the first update then gives scale = 0 and l * shift = 0
    # instead of 0 * inf = NaN. Key block 0 holds key 0, visible to every row, so the max becomes
    # a real score after the first tile.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)  # skip the tiles above the diagonal
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        s, keep = _tile_scores(q, _load_rows(K, base, cols, T, D, offs_d, d_ok), rows, cols, T, CAUSAL)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = m_i - m_new  # <= 0
        scale = tl.exp(shift)
        x = s - m_new[:, None]
        p = tl.exp(x)
        x = tl.where(keep, x, 0.0)  # masked: p = 0, x = -inf; 0 * -inf would be NaN
        # a stays relative to the running max, so H = log l - a / l is a sum of two
        # non-negative terms: no cancellation for large logits (small temperatures).
        a_i = scale * (a_i + l_i * shift) + tl.sum(p * x, 1)
        l_i = scale * l_i + tl.sum(p, 1)
        v = _load_rows(V, base, cols, T, D, offs_d, d_ok)
        acc = acc * scale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    row_ok = rows < T
    l_i = tl.where(row_ok, l_i, 1.0)  # padded rows (causal tail) saw no key: keep them NaN-free
    log_l = tl.log(l_i)
    tl.store(LSE + tl.program_id(1).to(tl.int64) * T + rows, m_i + log_l, mask=row_ok)
    tl.store(ENT + tl.program_id(1).to(tl.int64) * T + rows, log_l - a_i / l_i, mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _tile_ds(s, keep, lse, c, dh, do, v):
    """p and ds for one tile: p = exp(s - lse), ds = p * (dO v^T - c - dH * log p)."""
    logp = tl.where(keep, s - lse[:, None], float("-inf"))
    p = tl.exp(logp)
    logp = tl.where(keep, logp, 0.0)  # p = 0 there; avoid 0 * -inf
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - c[:, None] - dh[:, None] * logp)
    return p, ds


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, C, DH, DK, DV, T, D, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = _load_rows(K, base, cols, T, D, offs_d, d_ok)
    v = _load_rows(V, base, cols, T, D, offs_d, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: query blocks that end before this key block cannot see it.
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, T, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        q = _load_rows(Q, base, rows, T, D, offs_d, d_ok)
        do = _load_rows(DO, base, rows, T, D, offs_d, d_ok)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        c = tl.load(C + bh * T + rows, mask=row_ok, other=0.0)
        dh = tl.load(DH + bh * T + rows, mask=row_ok, other=0.0)
        s, keep = _tile_scores(q, k, rows, cols, T, CAUSAL)
        p, ds = _tile_ds(s, keep, lse, c, dh, do, v)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    kv_mask = (cols[:, None] < T) & d_ok[None, :]
    tl.store(DK + base + cols[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + cols[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, C, DH, DQ, T, D, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < T
    q = _load_rows(Q, base, rows, T, D, offs_d, d_ok)
    do = _load_rows(DO, base, rows, T, D, offs_d, d_ok)
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
    c = tl.load(C + bh * T + rows, mask=row_ok, other=0.0)
    dh = tl.load(DH + bh * T + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, base, cols, T, D, offs_d, d_ok)
        v = _load_rows(V, base, cols, T, D, offs_d, d_ok)
        s, keep = _tile_scores(q, k, rows, cols, T, CAUSAL)
        _, ds = _tile_ds(s, keep, lse, c, dh, do, v)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(DQ + base + rows[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _launch_config(d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). Not tuned on hardware yet: 64x64 tiles are the
    FlashAttention-2 defaults for head_dim <= 64; fp32 or head_dim 128 halve them to stay
    inside shared memory and registers."""
    block_d = max(16, triton.next_power_of_2(d))
    big = block_d > 64 or dtype == torch.float32
    block = 32 if big else 64
    return block, block, block_d, 4


class TritonEntropyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, block_m: int | None, block_n: int | None):
        b, h, T, d = q.shape
        bm, bn, bd, warps = _launch_config(d, q.dtype)
        bm, bn = block_m or bm, block_n or bn
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = torch.empty_like(q)
        lse = torch.empty((b, h, T), device=q.device, dtype=torch.float32)
        ent = torch.empty_like(lse)
        _fwd_kernel[(triton.cdiv(T, bm), b * h)](
            q, k, v, out, lse, ent, T, d, CAUSAL=causal,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
        ctx.save_for_backward(q, k, v, out, lse, ent)
        ctx.causal, ctx.config = causal, (bm, bn, bd, warps)
        return out, ent

    @staticmethod
    def backward(ctx, d_out, d_ent):
        q, k, v, out, lse, ent = ctx.saved_tensors
        bm, bn, bd, warps = ctx.config
        b, h, T, d = q.shape
        # Grads of unused outputs arrive as zeros (materialize_grads default).
        d_out = d_out.contiguous().to(q.dtype)
        dh = d_ent.float().contiguous()
        # Per-row constant of ds: c = D + dH * H with D = rowsum(dO * O). O(T d) work, done in torch.
        c = ((d_out.float() * out.float()).sum(-1) + dh * ent).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(CAUSAL=ctx.causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
        _bwd_dkdv_kernel[(triton.cdiv(T, bn), b * h)](
            q, k, v, d_out, lse, c, dh, dk, dv, T, d, **common)
        _bwd_dq_kernel[(triton.cdiv(T, bm), b * h)](
            q, k, v, d_out, lse, c, dh, dq, T, d, **common)
        return dq, dk, dv, None, None, None


def triton_entropy_attention(q, k, v, causal: bool = True, *, block_m: int | None = None,
                             block_n: int | None = None):
    """Same contract as `fused_entropy_attention` (q, k, v [b, h, T, d], q carries every scale;
    returns context in q's dtype and fp32 entropy [b, h, T]). block_m / block_n (powers of two
    >= 16) override the launch configuration, e.g. to exercise multi-block paths in tests."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, heads, T, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 128 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton path supports head_dim <= 128 and fp16/bf16/fp32; got "
                         f"{q.shape[-1]}, {q.dtype}")
    return TritonEntropyAttention.apply(q, k, v, bool(causal), block_m, block_n)
