"""Triton kernels for attention + per-row Shannon entropy (the GPU path of `fused_entropy_attention`).

Same contract and maths as `fused_attention.py` (see docs/fused_attention.md):
  forward   one program per (query block, batch*head): online softmax over key blocks, carrying
            m (running max), l = sum exp(s - m), a = sum exp(s - m) (s - m) and the context;
            writes O, H = log l - a / l and, for the backward, m, log l, xbar = a / l and the
            index of the row's largest score.
  backward  FlashAttention-2 split, no atomics: one kernel per key block accumulates dK, dV over
            the query blocks that see it; one kernel per query block accumulates dQ. Both
            recompute x = s - m, p = exp(x - log l) and use ds = p * (dP - D - dH * (x - xbar)),
            D = rowsum(dO * O): every term relative to the row max, none a difference of two
            logit-sized numbers. The dQ kernel also returns the gradient of softmax(s - s_max)
            (the residual sum_j ds_ij times k at the argmax), which keeps the temperature's
            gradient exact at small temperatures; docs/fused_attention.md has the analysis.
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
def _tile_scores(q, k, rows, cols, T, CAUSAL: tl.constexpr, doc_rows):
    """s = q k^T for one tile and keep = which (query, key) pairs are real and allowed
    (doc_rows: each query's document start, 0 without document attention)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    keep = (rows[:, None] < T) & (cols[None, :] < T) & (cols[None, :] >= doc_rows[:, None])
    if CAUSAL:
        keep = keep & (rows[:, None] >= cols[None, :])
    return s, keep


@triton.jit
def _doc_rows(DOC, bh, rows, T, HAS_DOC: tl.constexpr):
    """Document start of each query row (document attention), or 0."""
    if HAS_DOC:
        return tl.load(DOC + bh * T + rows, mask=rows < T, other=0)
    return tl.zeros(rows.shape, tl.int32)


@triton.jit
def _load_rows(ptr, base, idx, T, D, offs_d, d_ok):
    """[len(idx), BLOCK_D] tile of a [*, T, D] tensor; rows >= T and columns >= D read as 0."""
    return tl.load(ptr + base + idx[:, None] * D + offs_d[None, :],
                   mask=(idx[:, None] < T) & d_ok[None, :], other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, ROW, IDX, ENT, DOC, T, D, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D  # [batch*heads, T, D] contiguous
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(Q, base, rows, T, D, offs_d, d_ok)

    # A finite "minus infinity" start: the first update then gives scale = 0 and l * shift = 0
    # instead of 0 * inf = NaN. Key block 0 holds key 0, visible to every row, so the max becomes
    # a real score after the first tile.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    arg_i = tl.zeros([BLOCK_M], tl.int32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    doc_rows = _doc_rows(DOC, bh, rows, T, HAS_DOC)
    # Document attention: key blocks before the block's first document start are never visited.
    # A row that sees none of its keys in a tile keeps l = 0 there (its scores are -inf).
    lo = 0
    if HAS_DOC:
        lo = (tl.load(DOC + bh * T + start_m) // BLOCK_N) * BLOCK_N
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)  # skip the tiles above the diagonal
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        s, keep = _tile_scores(q, _load_rows(K, base, cols, T, D, offs_d, d_ok), rows, cols, T, CAUSAL, doc_rows)
        s = tl.where(keep, s, float("-inf"))
        tile_max = tl.max(s, 1)
        arg_i = tl.where(tile_max > m_i, tl.argmax(s, 1).to(tl.int32) + start_n, arg_i)
        m_new = tl.maximum(m_i, tile_max)
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
    xbar = a_i / l_i
    # Row statistics for the backward, all relative to the row max (see _tile_ds).
    row = bh * T + rows
    tl.store(ROW + row, m_i, mask=row_ok)
    tl.store(ROW + T * tl.num_programs(1) + row, log_l, mask=row_ok)
    tl.store(ROW + 2 * T * tl.num_programs(1) + row, xbar, mask=row_ok)
    tl.store(IDX + row, arg_i, mask=row_ok)
    tl.store(ENT + row, log_l - xbar, mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _load_row_stats(ROW, DELTA, DH, bh, rows, T, BH):
    """Per-row constants of the backward: max m, log l, xbar (from the forward), D, dH."""
    row_ok = rows < T
    row = bh * T + rows
    m = tl.load(ROW + row, mask=row_ok, other=0.0)
    log_l = tl.load(ROW + T * BH + row, mask=row_ok, other=0.0)
    xbar = tl.load(ROW + 2 * T * BH + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    dh = tl.load(DH + row, mask=row_ok, other=0.0)
    return m, log_l, xbar, delta, dh


@triton.jit
def _tile_ds(s, keep, m, log_l, xbar, delta, dh, do, v):
    """p and ds for one tile, relative to the row max (x = s - m, never a logit-sized difference):
    p = exp(x - log l), ds = p * (dO v^T - D - dH * (x - xbar)), since log p + H = x - xbar."""
    x = tl.where(keep, s - m[:, None], 0.0)
    p = tl.where(keep, tl.exp(x - log_l[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None] - dh[:, None] * (x - xbar[:, None]))
    return p, ds


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, ROW, DELTA, DH, DK, DV, DOC, DOC_END, T, D, CAUSAL: tl.constexpr,
                     HAS_DOC: tl.constexpr,
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
    hi = T
    if HAS_DOC:  # queries after the document of this block's last key cannot see it
        hi = tl.load(DOC_END + bh * T + tl.minimum(start_n + BLOCK_N, T) - 1)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q, base, rows, T, D, offs_d, d_ok)
        do = _load_rows(DO, base, rows, T, D, offs_d, d_ok)
        m, log_l, xbar, delta, dh = _load_row_stats(ROW, DELTA, DH, bh, rows, T, tl.num_programs(1))
        s, keep = _tile_scores(q, k, rows, cols, T, CAUSAL, _doc_rows(DOC, bh, rows, T, HAS_DOC))
        p, ds = _tile_ds(s, keep, m, log_l, xbar, delta, dh, do, v)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    kv_mask = (cols[:, None] < T) & d_ok[None, :]
    tl.store(DK + base + cols[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + cols[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, ROW, DELTA, DH, IDX, DQ, RES, DOC, T, D, CAUSAL: tl.constexpr,
                   HAS_DOC: tl.constexpr,
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
    m, log_l, xbar, delta, dh = _load_row_stats(ROW, DELTA, DH, bh, rows, T, tl.num_programs(1))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    residual = tl.zeros([BLOCK_M], tl.float32)  # sum_j ds_ij: zero in exact arithmetic
    doc_rows = _doc_rows(DOC, bh, rows, T, HAS_DOC)
    lo = 0
    if HAS_DOC:
        lo = (tl.load(DOC + bh * T + start_m) // BLOCK_N) * BLOCK_N
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, base, cols, T, D, offs_d, d_ok)
        v = _load_rows(V, base, cols, T, D, offs_d, d_ok)
        s, keep = _tile_scores(q, k, rows, cols, T, CAUSAL, doc_rows)
        _, ds = _tile_ds(s, keep, m, log_l, xbar, delta, dh, do, v)
        ds = ds.to(k.dtype)
        residual += tl.sum(ds.to(tl.float32), 1)
        dq += tl.dot(ds, k, input_precision="ieee")
    # The gradient of softmax(s - s_max): -r_i k_max(i) keeps the rounding residual r_i away from
    # the logits' size in the temperature's gradient -q_i . dq_i / t (fused_attention.py, backward).
    idx = tl.load(IDX + bh * T + rows, mask=row_ok, other=0)
    k_at_max = _load_rows(K, base, idx, T, D, offs_d, d_ok)
    dq -= residual[:, None] * k_at_max.to(tl.float32)
    tl.store(RES + bh * T + rows, residual, mask=row_ok)
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
    def forward(ctx, q, k, v, causal: bool, block_m: int | None, block_n: int | None, doc_start=None):
        b, h, T, d = q.shape
        bm, bn, bd, warps = _launch_config(d, q.dtype)
        bm, bn = block_m or bm, block_n or bn
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = torch.empty_like(q)
        row_stats = torch.empty((3, b * h, T), device=q.device, dtype=torch.float32)  # m, log l, xbar
        argmax = torch.empty((b * h, T), device=q.device, dtype=torch.int32)
        ent = torch.empty((b, h, T), device=q.device, dtype=torch.float32)
        doc, doc_end = _document_rows(doc_start, h, T, q.device)
        _fwd_kernel[(triton.cdiv(T, bm), b * h)](
            q, k, v, out, row_stats, argmax, ent, doc, T, d, CAUSAL=causal, HAS_DOC=doc_start is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
        ctx.save_for_backward(q, k, v, out, row_stats, argmax, doc, doc_end)
        ctx.has_doc = doc_start is not None
        ctx.causal, ctx.config = causal, (bm, bn, bd, warps)
        return out, ent

    @staticmethod
    def backward(ctx, d_out, d_ent):
        q, k, v, out, row_stats, argmax, doc, doc_end = ctx.saved_tensors
        bm, bn, bd, warps = ctx.config
        b, h, T, d = q.shape
        # Grads of unused outputs arrive as zeros (materialize_grads default).
        d_out = d_out.contiguous().to(q.dtype)
        dh = d_ent.float().contiguous()
        delta = (d_out.float() * out.float()).sum(-1).contiguous()  # D = rowsum(dO * O), O(T d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        residual = torch.empty((b * h, T), device=q.device, dtype=torch.float32)
        common = dict(CAUSAL=ctx.causal, HAS_DOC=ctx.has_doc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
        _bwd_dkdv_kernel[(triton.cdiv(T, bn), b * h)](
            q, k, v, d_out, row_stats, delta, dh, dk, dv, doc, doc_end, T, d, **common)
        _bwd_dq_kernel[(triton.cdiv(T, bm), b * h)](
            q, k, v, d_out, row_stats, delta, dh, argmax, dq, residual, doc, T, d, **common)
        # The other half of the gradient of softmax(s - s_max): -r_i q_i into dk at row i's argmax
        # key (O(T d); a scatter the per-key-block kernel cannot do without atomics).
        fix = (residual.unsqueeze(-1) * q.view(b * h, T, d).float()).neg_()
        dk_fp32 = dk.view(b * h, T, d).float().scatter_add_(1, argmax.long().unsqueeze(-1).expand(-1, -1, d), fix)
        return dq, dk_fp32.view(b, h, T, d).to(k.dtype), dv, None, None, None, None


def _document_rows(doc_start, heads: int, T: int, device):
    """[b*h, T] int32 document start of each query and (exclusive) end of each key's document;
    1-element placeholders without document attention (the kernels then never read them)."""
    if doc_start is None:
        empty = torch.zeros(1, dtype=torch.int32, device=device)
        return empty, empty
    starts = doc_start.to(device=device, dtype=torch.int64).repeat_interleave(heads, dim=0).contiguous()
    positions = torch.arange(T, device=device).expand_as(starts).contiguous()
    ends = torch.searchsorted(starts, positions, right=True)  # #queries whose start <= j
    return starts.to(torch.int32), ends.to(torch.int32)


def triton_entropy_attention(q, k, v, causal: bool = True, *, block_m: int | None = None,
                             block_n: int | None = None, doc_start=None):
    """Same contract as `fused_entropy_attention` (q, k, v [b, h, T, d], q carries every scale;
    returns context in q's dtype and fp32 entropy [b, h, T]). block_m / block_n (powers of two
    >= 16) override the launch configuration, e.g. to exercise multi-block paths in tests."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, heads, T, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 128 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton path supports head_dim <= 128 and fp16/bf16/fp32; got "
                         f"{q.shape[-1]}, {q.dtype}")
    if doc_start is not None and not causal:
        raise ValueError("doc_start (document attention) needs causal=True")
    return TritonEntropyAttention.apply(q, k, v, bool(causal), block_m, block_n, doc_start)
