"""Every variant builds and learns; FFN kinds, stabilisers and weight-decay groups behave."""

import pytest
import torch

from megatron_entropy.config import build_config
from megatron_entropy.model import VARIANTS, GPTModel, parameter_groups
from megatron_entropy.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_entropy.parallel.state import ParallelState

SMALL = ["--model.num_layers", "2", "--model.hidden_size", "32", "--model.num_heads", "4",
         "--model.seq_length", "16", "--model.vocab_size", "97"]


def small_model(variant, *extra, seed=0):
    cfg = build_config("tiny", SMALL + ["--model.variant", variant, *extra]).validate()
    return GPTModel(cfg.model, seed=seed), cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_with_finite_falling_loss(variant):
    torch.manual_seed(0)
    model, _ = small_model(variant, "--model.temperature_init", "1.0")
    opt = torch.optim.AdamW(parameter_groups(model, 0.0), lr=3e-3)
    batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_variant_structure():
    base, _ = small_model("SM+LN+G")
    fused, _ = small_model("SM+ScFuFFN")
    assert isinstance(base.layers[0].norm1, torch.nn.LayerNorm)
    assert isinstance(fused.layers[0].norm1, torch.nn.Identity)
    assert isinstance(fused.head.final_norm, torch.nn.Identity)
    assert base.layers[0].ffn.fc_in.weight.shape == (128, 32)  # d -> 4d
    assert fused.layers[0].ffn.fc.weight.shape == (32, 32)  # one d x d matrix
    assert fused.layers[0].ffn.alpha is not None and base.layers[0].ffn.alpha is None
    ereg, _ = small_model("EReg(SM(t)+ScFuFFN)")
    attn = ereg.layers[1].attention
    assert attn.log_temperature.shape == (4, 16) and attn.theta.shape == (4,)
    assert torch.allclose(attn.effective_temperature(), torch.full((4, 16), 1e-2))


def test_scaled_ffn_residual_is_eq8():
    model, _ = small_model("SM+ScFuFFN", "--model.alpha_init", "2.0", "--model.beta_init", "0.5")
    ffn = model.layers[0].ffn
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(ffn.residual(x, ffn(x)), 0.5 * x + ffn(x) / 2.0)


def test_weight_norm_rows_have_norm_g():
    layer = ColumnParallelLinear(6, 5, state=ParallelState.single(), normalization="weight_norm", seed=3)
    with torch.no_grad():
        layer.weight_g.copy_(torch.arange(1.0, 6.0))
        layer.weight.mul_(7.0)  # scaling v must not change the effective weight's row norms
    torch.testing.assert_close(layer.effective_weight().norm(dim=1), torch.arange(1.0, 6.0))
    row = RowParallelLinear(6, 5, state=ParallelState.single(), normalization="weight_norm", seed=3)
    x = torch.randn(3, 6)
    torch.testing.assert_close(row(x), x @ row.effective_weight().t())


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_spectral_norm_divides_by_the_largest_singular_value(cls):
    layer = cls(12, 8, state=ParallelState.single(), normalization="spectral_norm", seed=4)
    layer.train()
    for _ in range(30):
        layer(torch.randn(2, 12))
    effective = layer.effective_weight().detach()
    assert float(torch.linalg.matrix_norm(effective, ord=2)) == pytest.approx(1.0, rel=1e-3)
    sigma = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    torch.testing.assert_close(effective * sigma, layer.weight.detach(), rtol=1e-3, atol=1e-5)


def test_stabilizer_placements():
    model, _ = small_model("SM+SN", "--model.stabilizer_placement", "QK+FFN")
    attn, ffn = model.layers[0].attention, model.layers[0].ffn
    assert attn.q.normalization == attn.k.normalization == "spectral_norm"
    assert attn.v.normalization == attn.o.normalization == "none"
    assert ffn.fc_in.normalization == ffn.fc_out.normalization == "spectral_norm"
    wn, _ = small_model("SM+WN", "--model.stabilizer_placement", "QKVO+FFN")
    assert all(m.normalization == "weight_norm" for m in (wn.layers[0].attention.v, wn.layers[0].attention.o))


def test_weight_decay_groups():
    model, _ = small_model("EReg(SM(t)+ScFuFFN)", "--model.final_norm", "true", "--model.norm", "layernorm")
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for fragment in ("log_temperature", "theta", "ffn.alpha", "ffn.beta", "norm1.weight", "norm1.bias",
                     "final_norm.weight", "attention.q.bias"):
        assert any(fragment in n for n in no_decay_names), fragment
        assert not any(fragment in n for n in decay_names), fragment
    assert any("attention.q.weight" in n for n in decay_names) and any("ffn.fc.weight" in n for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_same_seed_same_weights_different_seed_different():
    a, _ = small_model("SM+LN+G", seed=5)
    b, _ = small_model("SM+LN+G", seed=5)
    c, _ = small_model("SM+LN+G", seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers[0].attention.q.weight, c.layers[0].attention.q.weight)


def test_padded_vocabulary_never_changes_the_loss():
    model, cfg = small_model("SM+LN+G")
    assert model.padded_vocab == 128 and cfg.model.vocab_size == 97
    ids = torch.randint(0, 97, (2, 17))
    logits = model(ids[:, :-1])
    assert logits.shape[-1] == 97
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model(ids[:, :-1], ids[:, 1:]), expected)


def test_entropy_penalty_reaches_temperature_and_theta():
    model, _ = small_model("EReg(SM(t)+ScFuFFN)", "--model.entropy_reg_coeff", "1.0",
                           "--model.temperature_init", "0.5")
    ids = torch.randint(0, 97, (2, 17))
    model(ids[:, :-1], ids[:, 1:]).backward()
    attn = model.layers[0].attention
    assert attn.theta.grad is not None and attn.theta.grad.abs().sum() > 0
    assert attn.log_temperature.grad is not None and attn.log_temperature.grad.abs().sum() > 0
