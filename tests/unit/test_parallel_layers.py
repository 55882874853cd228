"""Single-process checks of the tensor-parallel primitives (megatron_entropy/parallel).

At TP=1 the layers must be exactly the plain PyTorch modules they stand for; the sharding metadata
and the per-parameter initialisation are checked without processes by building the models of
every TP rank (construction needs no communication). The multi-process equivalence lives in
tests/dist/test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from megatron_entropy.config import ModelConfig
from megatron_entropy.model.gpt import GPTModel, padded_vocab_size
from megatron_entropy.model.variants import VARIANTS
from megatron_entropy.parallel import mappings
from megatron_entropy.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_entropy.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_entropy.parallel.random import normal_init
from megatron_entropy.parallel.state import ParallelState

SINGLE = ParallelState.single()


def _close(a, b, tol=1e-6):
    a, b = a.detach().double(), b.detach().double()
    assert float((a - b).norm() / b.norm().clamp_min(1e-30)) <= tol, float((a - b).abs().max())


def _plain_linear(layer) -> nn.Linear:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.detach() + torch.linspace(-1, 1, layer.out_features))
            layer.bias.copy_(lin.bias)
    return lin


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [False, True])
def test_tp1_linear_is_nn_linear(cls, bias):
    layer = cls(12, 20, state=SINGLE, bias=bias, seed=3, name="lin")
    lin = _plain_linear(layer)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), lin(x2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(layer.weight.grad, lin.weight.grad)
    if bias:
        assert torch.equal(layer.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_tp1_weight_norm_is_torch_weight_norm(cls):
    layer = cls(16, 24, state=SINGLE, normalization="weight_norm", seed=5, name="wn")
    with torch.no_grad():
        layer.weight_g.mul_(torch.linspace(0.5, 2.0, 24))  # g != ||v||: the scale matters
    lin = nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
    lin = parametrizations.weight_norm(lin, dim=0)
    with torch.no_grad():
        lin.parametrizations.weight.original0.copy_(layer.weight_g.view(24, 1))
        lin.parametrizations.weight.original1.copy_(layer.weight)
    x = torch.randn(4, 16)
    y, y2 = layer(x), lin(x)
    _close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    _close(layer.weight.grad, lin.parametrizations.weight.original1.grad)
    _close(layer.weight_g.grad, lin.parametrizations.weight.original0.grad.view(-1))


def test_weight_norm_starts_as_the_plain_layer():
    layer = ColumnParallelLinear(16, 24, state=SINGLE, normalization="weight_norm", seed=5, name="wn")
    _close(layer.effective_weight(), layer.weight, tol=1e-7)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_tp1_spectral_norm_is_torch_spectral_norm(cls):
    """Same u, v in -> the same one-step power iteration, sigma, output and gradients as torch's."""
    layer = cls(16, 24, state=SINGLE, normalization="spectral_norm", seed=7, name="sn")
    lin = nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
    lin = parametrizations.spectral_norm(lin)
    x = torch.randn(4, 16)
    layer(x)  # the first training forward runs the 15 initial iterations
    sn = lin.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.copy_(layer.spectral_u)
        sn._v.copy_(layer.spectral_v)
    y, y2 = layer(x), lin(x)
    _close(layer.spectral_u, sn._u)
    _close(layer.spectral_v, sn._v)
    _close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    _close(layer.weight.grad, lin.parametrizations.weight.original.grad)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_spectral_norm_converges_to_the_largest_singular_value(cls):
    layer = cls(16, 24, state=SINGLE, normalization="spectral_norm", seed=11, name="sn")
    x = torch.randn(2, 16)
    layer(x)
    layer._power_iteration(500)  # what 500 more training forwards would do
    sigma_max = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)
    _close(layer.effective_weight().detach(), layer.weight.detach() / sigma_max, tol=1e-5)
    # eval mode: no further power iterations (buffers frozen)
    layer.eval()
    u = layer.spectral_u.clone()
    layer(x)
    assert torch.equal(u, layer.spectral_u)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_spectral_norm_allows_several_forwards_before_backward(cls):
    """Pipeline schedules run several micro-batch forwards before their backwards."""
    layer = cls(8, 8, state=SINGLE, normalization="spectral_norm", seed=1, name="sn")
    x = torch.randn(2, 8)
    first, second = layer(x).square().sum(), layer(x).square().sum()
    first.backward()
    second.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_tp1_embedding_and_cross_entropy_are_plain_torch():
    emb = VocabParallelEmbedding(40, 8, state=SINGLE, seed=2, name="e", init_rows=37)
    ids = torch.randint(0, 37, (3, 6))
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight[37:].abs().max() == 0  # padding rows start at zero

    logits = torch.randn(3, 6, 40)
    logits[..., 37:] = 50.0  # huge padded logits must not matter
    logits.requires_grad_()
    target = torch.randint(0, 37, (3, 6))
    loss = vocab_parallel_cross_entropy(logits, target, true_vocab_size=37)
    ref_logits = logits.detach()[..., :37].clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, 37), target.reshape(-1), reduction="none").view(3, 6)
    _close(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    _close(logits.grad[..., :37], ref_logits.grad)
    assert logits.grad[..., 37:].abs().max() == 0


def test_mappings_are_identities_on_one_rank():
    x = torch.randn(3, 4, requires_grad=True)
    for fn in (mappings.copy_to_tp_region, mappings.reduce_from_tp_region, mappings.scatter_to_tp_region,
               mappings.gather_from_tp_region, mappings.all_reduce_partials):
        assert fn(x, None) is x


@pytest.mark.parametrize("d", [40, 64])
def test_padded_rows_do_not_change_real_rows(d):
    """torch's CPU normal_ redraws the last 16 values when numel % 16 != 0: init draws true rows only."""
    a = normal_init((1003, d), 0.02, 0, "embedding.tokens")
    for padded in (1004, 1008, 1024):
        b = normal_init((padded, d), 0.02, 0, "embedding.tokens", valid_rows=1003)
        assert torch.equal(a, b[:1003]) and b[1003:].abs().max() == 0


def _fake_tp_state(tp: int, rank: int) -> ParallelState:
    # Construction needs no communication, so every rank's shards can be built in one process.
    return ParallelState(world_size=tp, rank=rank, tp_size=tp, tp_rank=rank)


def _small_config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=16, vocab_size=1003,
                make_vocab_size_divisible_by=1, init_std=0.1)
    return ModelConfig(**dict(base, **overrides))


SHARDING_CASES = [dict(variant=v) for v in VARIANTS] + [
    dict(variant="SM+SN", stabilizer_placement="QKVO+FFN", learnable_temperature=True, entropy_reg=True),
    dict(variant="SM+WN", stabilizer_placement="QKVO+FFN"),
    dict(variant="SM(t)+ScFuFFN", temperature_param="raw"),
    dict(variant="SM+LN+G", tie_embeddings=False, vocab_size=1100, make_vocab_size_divisible_by=128),
]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("overrides", SHARDING_CASES, ids=lambda o: "/".join(f"{v}" for v in o.values()))
def test_shards_of_every_rank_rebuild_the_tp1_model(overrides, tp):
    """Every parameter declares partition_dim, and the ranks' shards concatenated along it are the
    TP=1 weights bit for bit (vocabulary padding, which grows with TP, is zero)."""
    cfg = _small_config(**overrides)
    ref = GPTModel(cfg, SINGLE, seed=9)
    ranks = [GPTModel(_small_config(**overrides), _fake_tp_state(tp, r), seed=9) for r in range(tp)]
    ref_modules = dict(ref.named_modules())
    for name, p in ref.named_parameters():
        shards = [dict(m.named_parameters())[name] for m in ranks]
        dims = {getattr(s, "partition_dim", "missing") for s in shards}
        assert len(dims) == 1 and "missing" not in dims, (name, dims)
        dim = dims.pop()
        if dim is None:
            for s in shards:
                assert torch.equal(s, p), name
            continue
        full = torch.cat([s.detach() for s in shards], dim=dim)
        assert all(s.shape[dim] * tp == full.shape[dim] for s in shards), name
        if full.shape != p.shape:  # vocabulary padding
            assert name in ("embedding.tokens.weight", "head.output.weight"), name
            assert full[p.shape[0]:].abs().max() == 0
            full = full[: p.shape[0]]
        assert torch.equal(full, p.detach()), name
    for mname, module in ranks[0].named_modules():
        for bname, dim in getattr(module, "buffer_partition_dims", {}).items():
            parts = [getattr(dict(m.named_modules())[mname], bname) for m in ranks]
            full = parts[0] if dim is None else torch.cat(parts, dim=dim)
            assert torch.equal(full, getattr(ref_modules[mname], bname)), (mname, bname)


def test_per_head_state_is_sharded_with_the_heads():
    cfg = _small_config(variant="EReg(SM(t)+ScFuFFN)", num_heads=8, hidden_size=64)
    for r in range(4):
        att = GPTModel(cfg, _fake_tp_state(4, r), seed=1).layers[0].attention
        assert att.heads_local == 2 and att.head_offset == 2 * r
        assert att.log_temperature.shape == (2, cfg.seq_length) and att.theta.shape == (2,)
        assert att.q.weight.shape == (16, 64) and att.o.weight.shape == (64, 16)


def test_padded_vocab_size():
    assert padded_vocab_size(1003, 1, 1) == 1003
    assert padded_vocab_size(1003, 1, 2) == 1004
    assert padded_vocab_size(1003, 1, 4) == 1004
    assert padded_vocab_size(1100, 128, 1) == 1152
    assert padded_vocab_size(1100, 128, 2) == 1280
    assert padded_vocab_size(1100, 128, 4) == 1536


def test_layers_reject_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        ColumnParallelLinear(8, 10, state=_fake_tp_state(3, 0))
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 4"):
        RowParallelLinear(10, 8, state=_fake_tp_state(4, 0))
