"""Blocked (flash-style) attention that also returns the Shannon entropy of every attention row.

The model's "fused" attention core calls `fused_entropy_attention`. It returns exactly what the
eager core returns -- (context, entropy) with entropy_i = -sum_j p_ij log p_ij in fp32 -- but never
builds the T x T probability matrix: it walks query blocks x key blocks with an online softmax and
keeps only O(T) per-row statistics. Backward recomputes the probabilities block by block from the
saved log-sum-exp. On CUDA with Triton available the same maths runs as Triton kernels
(`triton_attention.py`); everywhere else the pure-PyTorch `BlockedEntropyAttention` below is used.
The maths and the measured numbers are in docs/fused_attention.md.

Notation (per batch*head, per query row i): s_ij = q_i . k_j (q already carries every scale),
m_i the row max, x_ij = s_ij - m_i <= 0, l_i = sum_j exp(x_ij), a_i = sum_j exp(x_ij) x_ij,
xbar_i = a_i / l_i (the p-weighted mean of x), H_i = log l_i - xbar_i, O_i = sum_j exp(x_ij) v_j / l_i.
Every row quantity is kept RELATIVE TO THE ROW MAX, never as a logit-sized number (lse, sum p s):
with small temperatures the logits reach ~10^3 and a difference of two such numbers loses the
digits the gradient lives in (docs/fused_attention.md, "Accuracy"). The PyTorch path computes all of
these in base 2 (s2 = s log2 e, exp2, log2) and returns H in nats.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fused_entropy_attention", "blocked_entropy_attention", "BlockedEntropyAttention", "triton_self_check"]
log = logging.getLogger(__name__)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_entropy_attention(q, k, v, causal: bool = True, block_size: int = 128,
                            doc_start=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [batch, heads, T, head_dim] (any float dtype; q,k,v same dtype).
    q ALREADY carries every logit scale (1/sqrt(d_k) and the per-head, per-position learnable
    temperature 1/t[h,i]), so scores s_ij = q_i . k_j exactly, no further scaling.
    Returns (context [b,h,T,d] in q's dtype, entropy [b,h,T] float32) where
    entropy_i = -sum_j p_ij log p_ij over the (causally) allowed keys, p = softmax(s_i).
    Differentiable in q, k, v through BOTH outputs (the loss may depend on context and on entropy).

    On CUDA the Triton kernels are used when triton imports and they pass their self-check
    (`triton_self_check`, once per device and dtype); their block sizes are their own, so
    `block_size` only applies to the PyTorch path. Otherwise the blocked PyTorch path.
    doc_start [batch, T]: document attention (see `blocked_entropy_attention`)."""
    _check_inputs(q, k, v)
    if _use_triton(q):
        from megatron_entropy.model.triton_attention import triton_entropy_attention
        return triton_entropy_attention(q, k, v, causal=causal, doc_start=doc_start)
    return blocked_entropy_attention(q, k, v, causal=causal, block_size=block_size, doc_start=doc_start)


_TRITON_VERDICT: dict = {}  # (device, dtype) -> None (passed) or the reason it is not used


def _triton_eligible(q) -> bool:
    return q.is_cuda and q.shape[-1] <= 128 and q.dtype in _TRITON_DTYPES


def _use_triton(q) -> bool:
    if not _triton_eligible(q):
        return False
    key = (str(q.device), q.dtype)
    if key not in _TRITON_VERDICT:
        try:  # lazy: machines without triton (or without a GPU) never import it
            from megatron_entropy.model.triton_attention import triton_entropy_attention
        except ImportError as e:
            _TRITON_VERDICT[key] = f"triton unavailable ({e})"
        else:
            _TRITON_VERDICT[key] = triton_self_check(triton_entropy_attention, q.device, q.dtype)
            if _TRITON_VERDICT[key] is not None:
                log.warning("fused attention: the Triton kernels failed their self-check on %s %s (%s); "
                            "using the PyTorch path for the rest of this process", q.device, q.dtype,
                            _TRITON_VERDICT[key])
    return _TRITON_VERDICT[key] is None


# (T, head_dim, logit scale, causal): a tail block, an odd head_dim, flat and very sharp rows.
_SELF_CHECK_CASES = [(37, 24, 1.0, True), (64, 32, 100.0, True), (20, 16, 3.0, False)]


def triton_self_check(triton_fn, device, dtype) -> str | None:
    """Run `triton_fn` against the PyTorch path (fp32 maths on the same rounded inputs) on a few
    small shapes, forward and backward through both outputs (milliseconds on a GPU). None if they
    agree, else one line naming the first output that does not. The Triton path first runs on a
    user's cluster; a kernel that is wrong on their GPU or triton version must not train silently."""
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    g = torch.Generator().manual_seed(0)
    try:
        for T, d, scale, causal in _SELF_CHECK_CASES:
            base = [torch.randn(1, 2, T, d, generator=g) for _ in range(3)]
            base[0] = base[0] * (scale / math.sqrt(d))
            w_context, w_entropy = torch.randn(1, 2, T, d, generator=g), torch.randn(1, 2, T, generator=g)
            results = []
            for fn, dt in ((triton_fn, dtype), (blocked_entropy_attention, torch.float32)):
                leaves = [x.to(device=device, dtype=dtype).to(dt).requires_grad_() for x in base]
                context, entropy = fn(*leaves, causal=causal)
                loss = (context.float() * w_context.to(device)).sum() + (entropy.float() * w_entropy.to(device)).sum()
                loss.backward()
                results.append([context.detach().float(), entropy.detach().float()] + [x.grad.float() for x in leaves])
            for name, got, want in zip(("context", "entropy", "dq", "dk", "dv"), *results):
                err = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
                if not err <= tol:  # also catches NaN
                    return f"{name} off by {err:.2e} (tolerance {tol:g}) at T={T}, head_dim={d}, causal={causal}"
    except Exception as e:  # a kernel that does not compile or launch here
        return f"{type(e).__name__}: {e}"
    return None


def blocked_entropy_attention(q, k, v, causal: bool = True, block_size: int = 128, doc_start=None):
    """The device-independent PyTorch implementation (same contract as `fused_entropy_attention`;
    float64 inputs are the one exception: computed, and their entropy returned, in float64).

    doc_start [batch, T] (int, non-decreasing along T; causal only): document attention -- query i
    sees keys doc_start[b, i] <= j <= i. Key blocks that end before a query block's first document
    start are skipped, and only tiles that straddle a start build a mask, so documents cost less
    than the full causal triangle, never more."""
    _check_inputs(q, k, v)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if doc_start is not None:
        if not causal:
            raise ValueError("doc_start (document attention) needs causal=True")
        if doc_start.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"doc_start must be [batch, T] = {(q.shape[0], q.shape[2])}, got {tuple(doc_start.shape)}")
    return BlockedEntropyAttention.apply(q, k, v, bool(causal), int(block_size), doc_start)


def _check_inputs(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, heads, T, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16; float64 input stays float64 (exact checks, gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _blocks(T: int, block_size: int):
    return [(start, min(start + block_size, T)) for start in range(0, T, block_size)]


_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# Added to the scores above the causal diagonal: its exp2 is exactly 0, yet it is finite, so
# p * (score - max) stays 0 there (with -inf that is 0 * -inf = NaN and needs a second pass).
_MASKED = -1e30


def _block_views(buf: torch.Tensor, blocks, batch: int, d: int) -> list[torch.Tensor]:
    """Views [batch, n, d] of consecutive pieces of the flat buffer `buf`, one per block of T."""
    return [buf[batch * i0 * d: batch * i1 * d].view(batch, i1 - i0, d) for i0, i1 in blocks]


def _split_blocks(x: torch.Tensor, blocks, dtype: torch.dtype, scale: float | None = None):
    """[b, h, T, d] (any strides, e.g. the model's transposed view of [b, T, h, d]) -> one flat
    buffer of b*h*T*d elements holding a contiguous [b*h, n, d] piece per block of T, in `dtype`,
    optionally times `scale`; one pass over x. Returns (buffer, per-block views). Every tile's
    batched matmul then gets contiguous operands: with a block sliced out of [b*h, T, d] (batch
    stride T*d) bmm copies its operand first, once per tile instead of once per block."""
    b, h, T, d = x.shape
    buf = torch.empty(b * h * T * d, dtype=dtype, device=x.device)
    views = _block_views(buf, blocks, b * h, d)
    for (i0, i1), view in zip(blocks, views):
        piece = view.view(b, h, i1 - i0, d)
        if scale is None:
            piece.copy_(x[:, :, i0:i1])
        else:
            torch.mul(x[:, :, i0:i1], scale, out=piece)
    return buf, views


def _write_block(dest: torch.Tensor, i0: int, i1: int, part: torch.Tensor, scale: float | None = None) -> None:
    """part [b*h, n, d] into dest[:, :, i0:i1] (dest [b, h, T, d], any strides)."""
    b, h, _, d = dest.shape
    src = part.view(b, h, i1 - i0, d)
    if scale is None:
        dest[:, :, i0:i1].copy_(src)
    else:
        torch.mul(src, scale, out=dest[:, :, i0:i1])


class _DiagonalMasks:
    """Additive masks [n, n] (0 on and below the diagonal, _MASKED above) for the tiles that
    straddle the causal diagonal, built once per size and call. Query and key blocks are the same
    blocks, so such a tile is exactly a diagonal tile (j == i); tiles left of it are fully allowed
    and tiles right of it are never visited. Adding a mask is ~8x cheaper than masked_fill_ on CPU
    (29 vs 228 us for a 16 x 128 x 128 tile)."""

    def __init__(self, causal: bool, dtype, device, num_blocks: int, blocks):
        self.causal, self.cache = causal, {}
        for i0, i1 in (blocks if causal else []):  # built up front: worker threads only read
            n = i1 - i0
            if n >= 2 and n not in self.cache:
                upper = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
                self.cache[n] = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(upper, _MASKED)

    def __call__(self, i: int, j: int, n: int) -> torch.Tensor | None:
        if not self.causal or i != j or n < 2:
            return None
        return self.cache[n]


PARALLEL_MIN_SEQ = 256  # below this a call is too short to pay for starting threads


def _run_rows(fn, rows: int, T: int) -> None:
    """Run fn(r0, r1) over the batch*head rows. With one intra-op thread (or short sequences):
    inline. With N > 1: N Python threads, each running its own range of rows with ONE intra-op
    thread, joined at the end. Splitting the independent rows coarsely replaces thousands of small
    OpenMP regions per call (one per tile op, each ending in a barrier) by one join: on a shared,
    oversubscribed machine each barrier waits for a descheduled partner thread, which made the
    2-thread fused step 4-6x slower than the 1-thread one. torch releases the GIL inside ops, so the
    threads compute in parallel. torch.set_num_threads is per thread for OpenMP but process-wide
    for MKL, so the caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    n = min(threads, rows)
    if n <= 1 or T < PARALLEL_MIN_SEQ:
        fn(0, rows)
        return
    bounds = [(rows * w // n, rows * (w + 1) // n) for w in range(n)]
    grad_mode = torch.is_grad_enabled()

    def work(r):
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):
            fn(*r)

    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="fused_attention") as pool:
            for future in [pool.submit(work, r) for r in bounds]:
                future.result()  # re-raises a worker's exception here
    finally:
        torch.set_num_threads(threads)


def _key_range(i: int, num_blocks: int, causal: bool) -> range:
    """Key blocks query block i visits: all, or (causal) 0..i. Block 0 holds key 0, which every
    causal row may see, so the running max is a real score after the first tile."""
    return range(i + 1 if causal else num_blocks)


class _Documents:
    """Document attention for rows r0:r1 of the [batch*heads] dimension: which key blocks a query
    block visits (from the first document start among its queries) and the additive mask of a
    tile that straddles a start. A row's first visited tile may hold none of its keys: its scores
    are then all _MASKED, the running max too, and that tile's p = 1 terms are erased (scaled by
    exp2(_MASKED - m) = 0) when the tile holding the row's own document arrives -- the diagonal
    tile at the latest."""

    def __init__(self, doc_start, heads: int, blocks, dtype, device):
        rows = doc_start.to(device=device, dtype=torch.int64).repeat_interleave(heads, dim=0)  # [B, T]
        self.blocks, self.start = blocks, rows.to(dtype)
        self.first = [rows[:, i0] for i0, _ in blocks]
        self.last = [rows[:, i1 - 1] for _, i1 in blocks]
        self.columns = torch.arange(rows.shape[1], device=device, dtype=dtype)

    def key_range(self, i: int, r0: int, r1: int) -> range:
        lo = int(self.first[i][r0:r1].min())
        return range(next(j for j, (_, j1) in enumerate(self.blocks) if j1 > lo), i + 1)

    def latest_start(self, i: int, r0: int, r1: int) -> int:
        return int(self.last[i][r0:r1].max())

    def mask(self, i: int, j: int, r0: int, r1: int, latest_start: int):
        (i0, i1), (j0, j1) = self.blocks[i], self.blocks[j]
        if j0 >= latest_start:  # every query of the block starts at or before this key block
            return None
        allowed = self.columns[j0:j1][None, None, :] >= self.start[r0:r1, i0:i1, None]
        return torch.where(allowed, 0.0, _MASKED).to(self.start.dtype)


class _TileMasks:
    """The tiles (key block j, additive mask or None) that query block i visits for rows r0:r1:
    causal (diagonal masks) and, with doc_start, document attention on top."""

    def __init__(self, causal: bool, dtype, device, blocks, doc_start, heads: int):
        self.causal, self.blocks = causal, blocks
        self.diagonal = _DiagonalMasks(causal, dtype, device, len(blocks), blocks)
        self.documents = None if doc_start is None else _Documents(doc_start, heads, blocks, dtype, device)

    def visit(self, i: int, r0: int, r1: int):
        n = self.blocks[i][1] - self.blocks[i][0]
        if self.documents is None:
            return [(j, self.diagonal(i, j, n)) for j in _key_range(i, len(self.blocks), self.causal)]
        latest = self.documents.latest_start(i, r0, r1)
        out = []
        for j in self.documents.key_range(i, r0, r1):
            diagonal, document = self.diagonal(i, j, n), self.documents.mask(i, j, r0, r1, latest)
            out.append((j, document if diagonal is None else diagonal if document is None else document + diagonal))
        return out


class BlockedEntropyAttention(torch.autograd.Function):
    """Online-softmax attention + row entropy; saves q, k, v (as blocked copies), the output and
    three numbers per row (max m, log l, xbar: all base 2) -- O(T d) per head.

    Scores are kept in base 2 inside (q is multiplied by log2 e once, O(T d)): p = 2^(s2 - m2).
    On CPU `exp2` is ~3x cheaper than `exp` (82 vs 228 us for a 16 x 128 x 128 tile), and the
    exponential was the most expensive elementwise op of both passes. The entropy is returned in
    nats. Outputs and gradients take the memory layout of the inputs, so the model's
    transposes between [b, h, T, d] and [b, T, h*d] stay views."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, block_size: int, doc_start=None):
        b, h, T, d = q.shape
        B = b * h
        acc_dtype = _acc_dtype(q.dtype)
        blocks = _blocks(T, block_size)
        q2_buf, q2 = _split_blocks(q, blocks, acc_dtype, scale=_LOG2E)  # base 2: s2 = log2(e) s
        k_buf, kb = _split_blocks(k, blocks, acc_dtype)
        v_buf, vb = _split_blocks(v, blocks, acc_dtype)
        out = torch.empty_like(q, dtype=acc_dtype)
        # Per row, base 2, for the backward: the max m2, log2 l and xbar2 = sum_j p_ij (s2_ij - m2).
        row_stats = torch.empty(3, B, T, dtype=acc_dtype, device=q.device)
        max2, log2_sum, xbar2 = row_stats.unbind(0)
        ent = torch.empty(B, T, dtype=acc_dtype, device=q.device)
        tiles = _TileMasks(causal, acc_dtype, q.device, blocks, doc_start, h)
        out_buf = torch.empty_like(q2_buf)  # blocked like q2; written into `out` at the end

        def rows(r0: int, r1: int) -> None:  # the whole forward for batch*head rows r0:r1
            for i, (i0, i1) in enumerate(blocks):
                qb = q2[i][r0:r1]
                m = l = a = acc = None
                for j, mask in tiles.visit(i, r0, r1):
                    s = torch.bmm(qb, kb[j][r0:r1].transpose(1, 2))  # [rows, bq, bk], base 2
                    if mask is not None:
                        s.add_(mask)
                    m_blk = s.amax(-1, keepdim=True)
                    m_new = m_blk if m is None else torch.maximum(m, m_blk)
                    x = s.sub_(m_new)  # s - m_new, in place: s itself is not needed any more
                    p = x.exp2()  # exactly 0 where masked, and x is finite there: p * x = 0
                    pv = torch.bmm(p, vb[j][r0:r1])
                    l_blk = p.sum(-1, keepdim=True)
                    a_blk = x.mul_(p).sum(-1, keepdim=True)  # x is not needed after this either
                    if m is None:
                        l, a, acc = l_blk, a_blk, pv
                    else:
                        # Move the running sums to the new max. a is kept relative to the max
                        # (sum p~ (s - m)) so that H = log l - a / l has no cancellation even when
                        # the logits are huge (small temperatures): both terms are >= 0.
                        shift = m.sub_(m_new)  # <= 0; the old max is not needed any more
                        scale = shift.exp2()
                        a = a.addcmul_(l, shift).mul_(scale).add_(a_blk)
                        l = l.mul_(scale).add_(l_blk)
                        acc = acc.mul_(scale).add_(pv)
                    m = m_new
                log2_l = l.log2().squeeze(-1)
                a_over_l = (a / l).squeeze(-1)
                max2[r0:r1, i0:i1] = m.squeeze(-1)
                log2_sum[r0:r1, i0:i1] = log2_l
                xbar2[r0:r1, i0:i1] = a_over_l
                ent[r0:r1, i0:i1] = (log2_l - a_over_l).mul_(_LN2)
                torch.div(acc, l, out=out_blocks[i][r0:r1])

        out_blocks = _block_views(out_buf, blocks, B, d)
        _run_rows(rows, B, T)
        for (i0, i1), part in zip(blocks, out_blocks):
            _write_block(out, i0, i1, part)

        context = out.to(q.dtype)
        # Backward needs rowsum(dO * O) in fp32; for fp32 input `context` is that very tensor,
        # for bf16/fp16 the fp32 output is kept (O(T d), negligible next to T^2) so D is exact.
        # q, k, v are saved as their blocked copies (q in base 2), which is what the backward
        # reads; in the model nothing else holds on to q, k, v, so this costs no extra memory.
        # The backward recomputes every score tile with the same bmm on the same buffers, so it
        # sees the forward's scores bit for bit and the saved max is exactly one of them.
        out_saved = context if q.dtype == acc_dtype else out
        ctx.save_for_backward(q2_buf, k_buf, v_buf, out_saved, row_stats)
        ctx.causal, ctx.block_size, ctx.doc_start = causal, block_size, doc_start
        ctx.inputs = [(torch.empty_like(x, device="meta").stride(), x.dtype, x.device) for x in (q, k, v)]
        ctx.set_materialize_grads(False)  # an unused output gets None: skip its term
        entropy = ent.view(b, h, T)
        return context, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, d_context, d_entropy):
        q2_buf, k_buf, v_buf, out, row_stats = ctx.saved_tensors
        causal, block_size, doc_start = ctx.causal, ctx.block_size, ctx.doc_start
        b, h, T, d = out.shape
        B = b * h
        if d_context is None and d_entropy is None:
            return None, None, None, None, None, None
        acc_dtype = q2_buf.dtype
        blocks = _blocks(T, block_size)
        q2, kb, vb = (_block_views(buf, blocks, B, d) for buf in (q2_buf, k_buf, v_buf))
        # dk and dv accumulate in one contiguous [B, n, d] buffer per key block (an in-place
        # baddbmm_ into a strided slice falls back to one addmm per batch entry, ~2x slower).
        dk = _block_views(torch.zeros_like(k_buf), blocks, B, d)
        dv = _block_views(torch.zeros_like(v_buf), blocks, B, d) if d_context is not None else None
        (q_stride, q_dtype, device), (k_stride, k_dtype, _), (v_stride, v_dtype, _) = ctx.inputs
        shape = (b, h, T, d)
        dq = torch.empty_strided(shape, q_stride, dtype=acc_dtype, device=device)
        max2, log2_sum, xbar2 = (x.unsqueeze(-1) for x in row_stats.unbind(0))  # [B, T, 1] each
        tiles_of = _TileMasks(causal, acc_dtype, device, blocks, doc_start, h)

        # ds_ij = p_ij (dP_ij - D_i) - dH_i p_ij (log p_ij + H_i),  dP = dO v^T,
        # D_i = sum_j p_ij dP_ij = dO_i . O_i, and, relative to the row max (x = s - m, base 2):
        #   log p_ij + H_i = ln2 (x2_ij - log2 l_i) + ln2 (log2 l_i - xbar2_i) = ln2 (x2_ij - xbar2_i),
        #   p_ij = 2^(x2_ij - log2 l_i).
        # Each term is formed from x2 (exact where p matters: s2 and m2 are close there, so their
        # difference is exact) and row numbers of the size of log T -- never from two numbers of
        # the logits' size, whose difference in fp32 carries an error ~eps |s| that the
        # temperature's gradient (sum_j ds_ij s_ij / t) multiplies by |s| once more.
        if d_context is not None:
            do = _split_blocks(d_context, blocks, acc_dtype)[1]
            D = (d_context.to(acc_dtype) * out.to(acc_dtype)).sum(-1).reshape(B, T, 1)
        else:
            do, D = None, None
        dh = None if d_entropy is None else d_entropy.reshape(B, T, 1).to(acc_dtype) * _LN2
        c = D if D is not None else torch.zeros_like(xbar2)
        if dh is not None:
            c = c - dh * xbar2

        dq_blocks = _block_views(torch.empty_like(q2_buf), blocks, B, d)

        # Each query block's ds and p tiles are kept until its row sums are complete (see below):
        # chunk the rows so that they stay ~16 MiB per buffer whatever T is.
        chunk = max(1, (1 << 20) // (min(block_size, T) * T))

        def rows(r0: int, r1: int) -> None:  # the whole backward for batch*head rows r0:r1
            for c0 in range(r0, r1, chunk):
                rows_chunk(c0, min(c0 + chunk, r1))

        def rows_chunk(r0: int, r1: int) -> None:
            for i, (i0, i1) in enumerate(blocks):
                q2b = q2[i][r0:r1]
                m_b, logl_b = max2[r0:r1, i0:i1], log2_sum[r0:r1, i0:i1]
                do_b = do[i][r0:r1] if do is not None else None
                dh_b = dh[r0:r1, i0:i1] if dh is not None else None
                c_b = c[r0:r1, i0:i1]
                tiles, ds_rowsum = [], None
                for j, mask in tiles_of.visit(i, r0, r1):
                    kj = kb[j][r0:r1]
                    x = torch.bmm(q2b, kj.transpose(1, 2)).sub_(m_b)  # x2 = s2 - m2 <= 0
                    p = torch.sub(x, logl_b)  # log2 p
                    if mask is not None:  # p = 0 there; x stays finite, so its terms vanish with p
                        p.add_(mask)
                    p = p.exp2_()
                    # g = dP - D - dH ln2 (x2 - xbar2) = dP - c - dH ln2 x2 with c = D - dH ln2 xbar2:
                    # both row terms are x-sized (|xbar2| <= log2 T), so nothing cancels.
                    if do_b is not None:
                        dv[j][r0:r1].baddbmm_(p.transpose(1, 2), do_b)
                        g = torch.bmm(do_b, vb[j][r0:r1].transpose(1, 2)).sub_(c_b)
                        if dh_b is not None:
                            g.addcmul_(x, dh_b, value=-1.0)
                    else:
                        g = x.mul_(-dh_b).sub_(c_b)
                    ds = g.mul_(p)
                    row_sum = ds.sum(-1, keepdim=True)
                    ds_rowsum = row_sum if ds_rowsum is None else ds_rowsum.add_(row_sum)
                    tiles.append((j, ds, p))
                # sum_j ds_ij = 0 exactly (softmax is shift invariant); in fp32 it is a rounding
                # residual r_i, and it matters: the temperature's gradient is
                # -q_i . dq_i / t = -sum_j ds_ij s_ij / t, where r_i meets the row's logit size
                # (~1/t; D_i = dO_i . O_i is one source of r_i), and q_i (~1/t) carries it into dk.
                # Re-centring ds with p's weights, ds - r p (zero in exact arithmetic), before the
                # matmuls turns that sum into -sum_j ds_ij (s_ij - sbar_i): the residual then
                # meets x-sized numbers only. The eager core re-centres ds the same way.
                dq_b = dq_blocks[i][r0:r1]
                for n, (j, ds, p) in enumerate(tiles):
                    kj = kb[j][r0:r1]
                    ds.addcmul_(p, ds_rowsum, value=-1.0)
                    if n == 0:
                        torch.bmm(ds, kj, out=dq_b)
                    else:
                        dq_b.baddbmm_(ds, kj)
                    dk[j][r0:r1].baddbmm_(ds.transpose(1, 2), q2b)  # = log2(e) dk: q2 is in base 2

        _run_rows(rows, B, T)
        for (i0, i1), part in zip(blocks, dq_blocks):
            _write_block(dq, i0, i1, part)

        dk_out = torch.empty_strided(shape, k_stride, dtype=acc_dtype, device=device)
        for (j0, j1), part in zip(blocks, dk):
            _write_block(dk_out, j0, j1, part, scale=_LN2)
        if dv is not None:
            dv_out = torch.empty_strided(shape, v_stride, dtype=acc_dtype, device=device)
            for (j0, j1), part in zip(blocks, dv):
                _write_block(dv_out, j0, j1, part)
        else:
            dv_out = torch.zeros(shape, dtype=acc_dtype, device=device)
        return dq.to(q_dtype), dk_out.to(k_dtype), dv_out.to(v_dtype), None, None, None
