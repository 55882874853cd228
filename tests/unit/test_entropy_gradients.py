"""The gradients the paper's method lives on, over the whole range the model visits.

The learnable temperature t scales q (q_i / (t_i sqrt(d))), so dt_i = -q_i . dq_i / t_i: every
rounding residual of the attention backward that meets the logits' size (~1/t) shows up here.
Each core is compared against a float64 reference for t from 1e-3 (logits ~10^3, near one-hot
rows) to 10 (near-uniform rows), short and long rows, causal or not, and a loss through the
context, the entropy, or both.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_entropy.model.attention import eager_core
from megatron_entropy.model.entropy import EntropyRegularization
from megatron_entropy.model.fused_attention import blocked_entropy_attention
from tests.unit.test_entropy import official_compute_loss

NAMES = ("dq", "dk", "dv", "dt")


def reference_core(q, k, v, causal=True):
    """Float64 ground truth: softmax attention and -sum p log p, straight from the definitions."""
    s = q @ k.transpose(-1, -2)
    T = s.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    log_p = torch.log_softmax(s.masked_fill(~allowed, -math.inf), -1)
    p = log_p.exp()
    return p @ v, -(p * log_p.masked_fill(~allowed, 0.0)).sum(-1)


def gradients(core, dtype, t0, T, d, causal, mode, seed=0, b=2, h=3):
    """Grads of q_raw, k, v and t for loss = <w, context> and/or <w', entropy>, with the model's
    scaling q = q_raw / (t sqrt(d)) and t random per (head, row) around t0 (x e^{0.3 N(0,1)})."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    t = t0 * torch.exp(0.3 * torch.randn(h, T, generator=g, dtype=torch.float64))
    w_context = torch.randn(b, h, T, d, generator=g, dtype=torch.float64)
    w_entropy = torch.randn(b, h, T, generator=g, dtype=torch.float64)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, t)]
    scaled_q = leaves[0] / (leaves[3] * math.sqrt(d))[None, :, :, None]
    context, entropy = core(scaled_q, leaves[1], leaves[2], causal)
    loss = 0.0
    if mode in ("both", "context"):
        loss = loss + (context.double() * w_context).sum()
    if mode in ("both", "entropy"):
        loss = loss + (entropy.double() * w_entropy).sum()
    loss.backward()
    return [torch.zeros(x.shape, dtype=torch.float64) if x.grad is None else x.grad.double() for x in leaves]


def relative_error(got, want):
    """Norm-relative error; absolute where the exact gradient is 0 (T = 1: one key per row)."""
    scale = want.norm()
    return float((got - want).norm() / scale) if scale > 0 else float(got.norm())


CORES = {
    "eager": lambda q, k, v, causal: eager_core(q, k, v, causal, True),
    "fused": lambda q, k, v, causal: blocked_entropy_attention(q, k, v, causal, 16),
}


@pytest.mark.parametrize("t0", [1e-3, 1e-2, 1e-1, 1.0, 10.0])
def test_fused_and_eager_gradients_over_the_temperature_range(t0):
    """fp32 fused and eager below 1e-3 for every t, T in {1, 17, 64, 150}, head_dim {8, 32},
    causal or not, and each loss (192 gradients per t); fused within 10x of eager per case,
    or below 2e-4 (3 of 960 cases, all dt at t = 1e-3 where the eager core happens to be at
    1e-6 -- 1.3e-5), and the worst fused error per (t, gradient) within 3x of the worst eager one.
    Measured worst (fused / eager): dt 4.0e-4 / 2.6e-4 at t = 1e-3, 3.6e-5 / 2.9e-5 at t = 1e-2.
    Before the row-max formulation the fused dt was off by 4.2 (t = 1e-3) and 4.7e-2 (t = 1e-2,
    entropy only), and the eager dt by 4.0e-3 (t = 1e-3)."""
    worst = {core: dict.fromkeys(NAMES, 0.0) for core in CORES}
    for T in (1, 17, 64, 150):
        for d in (8, 32):
            for causal in (True, False):
                for mode in ("both", "entropy", "context"):
                    want = gradients(reference_core, torch.float64, t0, T, d, causal, mode)
                    errs = {name: [relative_error(g, w) for g, w in
                                   zip(gradients(core, torch.float32, t0, T, d, causal, mode), want)]
                            for name, core in CORES.items()}
                    for i, name in enumerate(NAMES):
                        fused, eager = errs["fused"][i], errs["eager"][i]
                        case = (name, T, d, causal, mode, fused, eager)
                        assert fused < 1e-3 and eager < 1e-3, case
                        assert fused <= max(10 * eager + 1e-6, 2e-4), case
                        for core in CORES:
                            worst[core][name] = max(worst[core][name], errs[core][i])
    for name in NAMES:
        assert worst["fused"][name] <= 3 * worst["eager"][name] + 1e-6, (name, worst)
    print(t0, {core: {k: f"{v:.1e}" for k, v in w.items()} for core, w in worst.items()})


def test_near_one_hot_and_near_uniform_rows_at_long_t():
    """Very sharp rows (t = 1e-3 with a few exact ties broken by 1e-3) and flat rows in one
    batch, T = 300 (three key blocks of 128, the last ragged): the temperature gradient of the
    fused core agrees with float64 as well as the eager core's does."""
    want = gradients(reference_core, torch.float64, 3e-3, 300, 16, True, "both", seed=5, b=1, h=2)
    got = gradients(lambda q, k, v, c: blocked_entropy_attention(q, k, v, c, 128), torch.float32,
                    3e-3, 300, 16, True, "both", seed=5, b=1, h=2)
    eager = gradients(CORES["eager"], torch.float32, 3e-3, 300, 16, True, "both", seed=5, b=1, h=2)
    for name, g, e, w in zip(NAMES, got, eager, want):
        assert relative_error(g, w) < max(1e-3, 10 * relative_error(e, w)), name


# ---------------------------------------------------------------------------------------------
# The drop-in regulariser on a real Hugging Face causal model


def gpt2_gradients(loss_fn):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=16, vocab_size=50,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_attentions=True)
    assert any((a == 0).any() for a in out.attentions)  # masked keys have probability exactly 0
    loss_fn(out.attentions).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_drop_in_regulariser_on_hf_gpt2_has_finite_official_gradients():
    """With eager attention and output_attentions=True every causal row has masked keys (p = 0).
    The drop-in loss's gradient is finite on every parameter and equals the official formula's
    (which sees log(A + 1e-9)) to 1e-3 relative; xlogy's gradient at 0 made it NaN before."""
    thresholds = torch.tensor([0.9, 0.2, 0.5, 0.95])  # several heads outside the margin
    reg = EntropyRegularization(loss_coeff=1.0, tolerance_margin_factor=0.2)
    ours = gpt2_gradients(lambda att: reg.compute_loss(att, thresholds, num_heads=4, num_layers=2))
    official = gpt2_gradients(lambda att: official_compute_loss(att, thresholds, 4, 2, coeff=1.0))
    assert ours.keys() == official.keys() and len(ours) > 10
    total = sum(float(g.norm() ** 2) for g in official.values()) ** 0.5
    assert total > 0
    for name, g in ours.items():
        assert torch.isfinite(g).all(), name
        # per tensor, relative to the tensor (or, for near-zero tensors, to the whole gradient)
        scale = max(float(official[name].norm()), 1e-3 * total)
        assert float((g - official[name]).norm()) <= 1e-3 * scale, name


def test_compute_entropy_gradient_is_finite_at_zero_probability():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    EntropyRegularization.compute_entropy(p).sum().backward()
    assert torch.isfinite(p.grad).all()
    # d(-sum p log p)/dp = -(log p + 1) where p > 0
    assert p.grad[1, 0].item() == pytest.approx(-(math.log(0.5) + 1), rel=1e-6)
    assert p.grad[0, 0].item() == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# Training: the temperature's trajectory


def _temperature_trajectory(core: str, init_std: float, steps: int, dtype=torch.float32):
    from megatron_entropy.config import build_config
    from megatron_entropy.model.gpt import GPTModel, parameter_groups

    args = ["--model.variant", "EReg(SM(t)+ScFuFFN)", "--model.attention_core", core,
            "--model.num_layers", "2", "--model.hidden_size", "32", "--model.num_heads", "4",
            "--model.seq_length", "160", "--model.vocab_size", "96",
            "--model.make_vocab_size_divisible_by", "1", "--model.qk_bias", "false",
            "--model.init_std", str(init_std), "--model.temperature_init", "0.01",
            "--model.entropy_reg_coeff", "1e-3"]
    torch.manual_seed(0)
    model = GPTModel(build_config("tiny", args).model, seed=7).to(dtype)
    model.aux_scale.value = 1.0
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(steps):
        tokens = torch.randint(0, 96, (2, 161), generator=g)
        opt.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        trajectory.append(torch.stack([layer.attention.log_temperature.detach().double().clone()
                                       for layer in model.layers]))
    return torch.stack(trajectory)[..., 1:]  # position 0 has one key: its exact gradient is 0


def _distance(trajectory, reference, step):
    """|log t - log t_ref| at `step`, relative to how far the reference has moved by then."""
    return float((trajectory[step] - reference[step]).norm() / (reference[step] - reference[0]).norm())


@pytest.mark.parametrize("init_std,steps", [(0.02, 50), (0.2, 50)])
def test_temperature_trajectory_fused_vs_eager_vs_float64(init_std, steps):
    """50 AdamW steps (lr 1e-3) from the paper's t = 1e-2, 2-layer EReg model, T = 160 (the fused
    core's ragged second block). The truth is the eager core in float64.

    init_std 0.02 (the presets'): logits start small, both fp32 cores stay within 1e-3 of float64
    (measured 9e-5 at step 5, 3e-5 at step 49, fused and eager alike; the old fused backward did
    too: its error grew with the logits, which are small here). init_std 0.2: logits of ~10^2,
    the regime the bug lived in -- the old fused core was 15% off float64 after 5 steps, now
    1.3e-4 (10 steps: 2.4e-4). Tolerance over the whole 50 steps: no further from float64 than the
    fp32 eager core itself (measured 4.2e-2 vs 1.35e-1), because Adam turns the rounding of
    near-zero gradients (near one-hot rows) into full +-lr steps, so any two fp32 runs separate
    slowly from each other and from float64; a test against a fixed tolerance at step 50 would
    measure that chaos, not the gradient."""
    reference = _temperature_trajectory("eager", init_std, steps, torch.float64)
    fused = _temperature_trajectory("fused", init_std, steps)
    eager = _temperature_trajectory("eager", init_std, steps)
    assert _distance(fused, reference, 5) < 1e-3 and _distance(fused, reference, 9) < 1e-3
    last = steps - 1
    assert _distance(fused, reference, last) <= max(1e-3, _distance(eager, reference, last))
