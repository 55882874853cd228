"""Document attention in the fused CPU core: a packed batch equals each document run alone."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_entropy.model.fused_attention import blocked_entropy_attention


def doc_starts(lengths):
    starts, pos = [], 0
    for n in lengths:
        starts += [pos] * n
        pos += n
    return torch.tensor(starts)


def packed_and_alone(lengths_per_sample, d=16, h=2, t0=0.05, block=16, dtype=torch.float64, seed=0):
    """Grads of q, k, v and entropies for a packed batch (document attention) and for each
    document run alone (plain causal attention), for loss <w, context> + <w', entropy>."""
    T = sum(lengths_per_sample[0])
    b = len(lengths_per_sample)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    q = q / (t0 * math.sqrt(d))
    w_o, w_e = torch.randn(b, h, T, d, generator=g, dtype=torch.float64), torch.randn(b, h, T, generator=g, dtype=torch.float64)
    doc_start = torch.stack([doc_starts(lengths) for lengths in lengths_per_sample])

    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    context, entropy = blocked_entropy_attention(*leaves, causal=True, block_size=block, doc_start=doc_start)
    ((context.double() * w_o).sum() + (entropy.double() * w_e).sum()).backward()
    packed = [context.detach().double(), entropy.detach().double()] + [x.grad.double() for x in leaves]

    alone = [torch.zeros_like(x) for x in packed]
    for row, lengths in enumerate(lengths_per_sample):
        pos = 0
        for n in lengths:
            sl = slice(pos, pos + n)
            part = [x[row:row + 1, :, sl].to(dtype).detach().requires_grad_() for x in (q, k, v)]
            c, e = blocked_entropy_attention(*part, causal=True, block_size=block)
            ((c.double() * w_o[row:row + 1, :, sl]).sum() + (e.double() * w_e[row:row + 1, :, sl]).sum()).backward()
            for out, got in zip(alone, [c.detach().double(), e.detach().double()] + [x.grad.double() for x in part]):
                out[row:row + 1, :, sl] = got
            pos += n
    return packed, alone


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_packed_documents_equal_each_document_alone(dtype, tol):
    """Two samples of T = 70 with documents of 1, 16, 17, 30 ... tokens: boundaries inside and
    on block edges (block 16), a one-token document, a document spanning several blocks."""
    lengths = [[1, 16, 17, 30, 6], [40, 30]]
    packed, alone = packed_and_alone(lengths, dtype=dtype)
    for name, got, want in zip(("context", "entropy", "dq", "dk", "dv"), packed, alone):
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
        assert err < tol, (name, err)


def test_one_document_is_plain_causal_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    plain = blocked_entropy_attention(q, k, v, True, 16)
    one_doc = blocked_entropy_attention(q, k, v, True, 16, doc_start=torch.zeros(2, 40, dtype=torch.long))
    for a, b in zip(plain, one_doc):
        assert torch.equal(a, b)


def test_doc_start_is_validated():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="causal"):
        blocked_entropy_attention(q, q, q, False, 4, doc_start=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, T\]"):
        blocked_entropy_attention(q, q, q, True, 4, doc_start=torch.zeros(1, 7, dtype=torch.long))
