"""The entropy regulariser against direct implementations of the paper's Algorithm 1."""

import math

import pytest
import torch

from megatron_entropy import EntropyRegularization
from megatron_entropy.model.attention import eager_core
from megatron_entropy.model.entropy import AttachAuxLoss, entropy_bins, head_penalties


def random_attention(b, h, T, generator, causal=True):
    scores = torch.randn(b, h, T, T, generator=generator, dtype=torch.float64) * 3
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def algorithm1(attn_maps, thetas, gamma, reduction="paper_sum", reference_tokens=16384):
    """Algorithm 1 written out with loops, one head and one token at a time (float64)."""
    L = len(attn_maps)
    total = 0.0
    for layer, attn in enumerate(attn_maps):
        b, H, T, _ = attn.shape
        e_max = math.log(T)
        layer_sum = 0.0
        for h in range(H):
            head = 0.0
            head_entropy = 0.0  # paper_text: the head's entropy averaged over sequences and queries
            for s in range(b):
                for i in range(T):
                    row = attn[s, h, i]
                    ent = -sum(float(p) * math.log(float(p)) for p in row if p > 0)
                    head_entropy += ent / (b * T)
                    delta = ent - float(thetas[layer][h]) * e_max
                    head += delta ** 2 if abs(delta) > gamma * e_max else 0.0
            if reduction == "token_mean":
                head = head / (b * T) * reference_tokens
            if reduction == "paper_text":
                delta = head_entropy - float(thetas[layer][h]) * e_max
                head = delta ** 2 if abs(delta) > gamma * e_max else 0.0
            layer_sum += head
        total += layer_sum / H
    return total / L


@pytest.mark.parametrize("reduction", ["paper_sum", "token_mean", "paper_text"])
def test_penalty_equals_algorithm1(reduction):
    g = torch.Generator().manual_seed(0)
    maps = [random_attention(2, 3, 7, g) for _ in range(2)]
    thetas = torch.rand(2, 3, generator=g, dtype=torch.float64)
    ours = 0.0
    for layer, attn in enumerate(maps):
        entropy = EntropyRegularization.compute_entropy(attn)
        ours += float(head_penalties(entropy, thetas[layer], math.log(7), 0.2, reduction, 16384).sum()) / 3
    ours /= 2
    assert ours == pytest.approx(algorithm1(maps, thetas, 0.2, reduction), rel=1e-6)
    assert ours > 0  # the random thetas put most rows outside the margin


def test_paper_text_penalises_the_head_mean_not_the_rows():
    """Rows on both sides of the threshold: every row pays under paper_sum, the head's mean does not."""
    log_t = math.log(16)
    theta = torch.tensor([0.5, 0.5], dtype=torch.float64)
    centre = 0.5 * log_t
    spread = torch.tensor([centre - 0.5 * log_t, centre + 0.5 * log_t], dtype=torch.float64)  # |delta| > 0.2 log T
    entropy = torch.stack([spread.repeat(4), spread.repeat(4) + 0.3 * log_t])[None]  # [1, 2 heads, 8 rows]
    per_row = head_penalties(entropy, theta, log_t, 0.2, "paper_sum")
    per_head = head_penalties(entropy, theta, log_t, 0.2, "paper_text")
    assert float(per_row[0]) == pytest.approx(8 * (0.5 * log_t) ** 2, rel=1e-6)
    assert float(per_head[0]) == 0.0  # mean exactly on the threshold
    assert float(per_head[1]) == pytest.approx((0.3 * log_t) ** 2, rel=1e-6)  # mean outside the margin


def test_penalty_gradients_equal_autograd_of_direct_formula():
    g = torch.Generator().manual_seed(1)
    entropy = (torch.rand(2, 4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    theta = torch.rand(4, generator=g, dtype=torch.float64).requires_grad_()
    log_t, tol = math.log(9), 0.2 * math.log(9)
    ours = head_penalties(entropy, theta, log_t, 0.2, "paper_sum").sum()
    ours.backward()
    delta = entropy.detach() - theta.detach()[None, :, None] * log_t
    mask = (delta.abs() > tol).double()
    expected_d_entropy = 2 * delta * mask
    expected_d_theta = (-2 * delta * mask * log_t).sum(dim=(0, 2))
    torch.testing.assert_close(entropy.grad.double(), expected_d_entropy.float().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta.grad.double(), expected_d_theta.float().double(), rtol=1e-5, atol=1e-5)


def official_compute_loss(attentions, thresholds, num_heads, num_layers, coeff=1e-5, gamma=0.2):
    """The official repository's formula (per-token sum, nansum, log(a + 1e-9))."""
    e_max = torch.log(torch.tensor(float(attentions[0].shape[-1])))
    total = 0
    for attn in attentions:
        ent = -torch.nansum(attn * torch.log(attn + 1e-9), dim=-1)
        layer = 0
        for h in range(num_heads):
            dev = ent[:, h, :] - thresholds[h] * e_max
            layer += torch.square(torch.where(dev.abs() > gamma * e_max, dev, torch.zeros_like(dev))).sum()
        total += layer / num_heads
    return coeff * total / num_layers


def test_drop_in_api_matches_official_formula():
    g = torch.Generator().manual_seed(2)
    maps = [random_attention(3, 4, 16, g).float() for _ in range(3)]
    shared = torch.rand(4, generator=g)
    reg = EntropyRegularization(loss_coeff=1e-5, tolerance_margin_factor=0.2)
    ours = reg.compute_loss(maps, shared, num_heads=4, num_layers=3)
    # log(a + 1e-9) vs exact log p differ by ~1e-9 per term; the totals agree to ~1e-5.
    assert float(ours) == pytest.approx(float(official_compute_loss(maps, shared, 4, 3)), rel=2e-4)
    metrics = reg.log_entropy_metrics(maps)
    assert len(metrics) == 12 and "attn.2.head.3.entropy" in metrics


def test_per_layer_thresholds_are_used_per_layer():
    g = torch.Generator().manual_seed(3)
    maps = [random_attention(2, 2, 8, g) for _ in range(2)]
    per_layer = torch.tensor([[0.1, 0.9], [0.9, 0.1]], dtype=torch.float64)
    reg = EntropyRegularization(loss_coeff=1.0)
    ours = float(reg.compute_loss(maps, per_layer, num_heads=2, num_layers=2))
    assert ours == pytest.approx(algorithm1(maps, per_layer, 0.2), rel=1e-6)
    reused_layer0 = float(reg.compute_loss(maps, per_layer[0], num_heads=2, num_layers=2))
    assert abs(ours - reused_layer0) > 1e-3 * ours  # the official example's bug gives another value
    as_list = float(reg.compute_loss(maps, [per_layer[0], per_layer[1]], num_heads=2, num_layers=2))
    assert as_list == pytest.approx(ours)


def row_entropy_reference(q, k, causal=True):
    s = q.double() @ k.double().transpose(-1, -2)
    if causal:
        T = s.shape[-1]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    p = s.softmax(-1)
    return -torch.special.xlogy(p, p).sum(-1)


@pytest.mark.parametrize("causal", [True, False])
def test_eager_core_entropy_and_context(causal):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    context, entropy = eager_core(q, k, v, causal=causal)
    torch.testing.assert_close(entropy.double(), row_entropy_reference(q, k, causal), rtol=1e-5, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    torch.testing.assert_close(context, sdpa, rtol=1e-5, atol=1e-5)
    assert entropy.dtype == torch.float32 and (entropy >= 0).all()


def test_large_temperature_gives_uniform_causal_entropy():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    _, entropy = eager_core(q / 1e6, k, v)  # logits / (t sqrt(d)) with t = 1e6
    expected = torch.log(torch.arange(1, 17, dtype=torch.float32))
    torch.testing.assert_close(entropy[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_small_temperature_sharpens_and_stays_nonnegative():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 32, 8, generator=g) for _ in range(3))
    means = [float(eager_core(q / t, k, v)[1].mean()) for t in (10.0, 1.0, 0.1, 1e-3)]
    assert means == sorted(means, reverse=True) and means[-1] < 0.05 * means[0]
    assert float(eager_core(q / 1e-4, k, v)[1].min()) >= 0.0


def test_attach_aux_loss_equals_adding_the_loss():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 5, generator=g, requires_grad=True)
    x = torch.randn(3, 5, generator=g)

    def forward(attach):
        h = x @ w
        aux = (h ** 2).mean() * 0.3
        if attach:
            return AttachAuxLoss.apply(h, aux, 0.5).sum() * 0.5  # main loss scaled by 0.5 (e.g. 1/GAS)
        return (h.sum() + aux) * 0.5

    forward(True).backward()
    attached = w.grad.clone()
    w.grad = None
    forward(False).backward()
    torch.testing.assert_close(attached, w.grad)


def test_entropy_bins_on_hand_made_matrices():
    assert entropy_bins([[1.0, 2.0], [3.0, 4.0]]) == [0.0, 0.25, 0.25, 0.5]  # m = 4: 1 -> bin 1
    assert entropy_bins([[0.1, 0.2, 0.3, 4.0]]) == [0.75, 0.0, 0.0, 0.25]
    assert entropy_bins([[4.0, 4.0]]) == [0.0, 0.0, 0.0, 1.0]
    assert sum(entropy_bins(torch.rand(12, 12) * 4)) == pytest.approx(1.0)
    # Fig. 3f of the paper (SM model, layers 0-11) reproduces the reported 33% / 45% split.


def _attention_module(temperature_param):
    from megatron_entropy.config import build_config
    from megatron_entropy.model.attention import ParallelSelfAttention
    from megatron_entropy.parallel.state import ParallelState

    cfg = build_config("tiny", ["--model.num_heads", "2", "--model.hidden_size", "16", "--model.seq_length", "12",
                                "--model.temperature_param", temperature_param]).model
    return ParallelSelfAttention(cfg, cfg.spec(), ParallelState.single(), layer_number=0, seed=0)


@pytest.mark.parametrize("temperature_param", ["log", "raw"])
def test_model_temperature_semantics(temperature_param):
    from megatron_entropy.model.entropy import EntropyStats

    attn = _attention_module(temperature_param)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(8))

    def row_entropy(t_value):
        with torch.no_grad():
            if attn.log_temperature is not None:
                attn.log_temperature.fill_(math.log(t_value))
            else:
                attn.temperature.fill_(t_value)
        stats = EntropyStats(1, 2)
        stats.active = True
        stats.micro_batches = 1
        attn(x, stats)
        return torch.tensor(stats.reduce()["entropy"][0], dtype=torch.float64), stats

    uniform, _ = row_entropy(1e6)  # huge t: every row uniform over its causal prefix
    expected = float(torch.log(torch.arange(1, 13, dtype=torch.float64)).mean())
    torch.testing.assert_close(uniform, torch.full((2,), expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    sharp, _ = row_entropy(1e-3)
    assert (sharp < 0.5 * uniform).all()


def test_penalty_gradient_reaches_temperature_and_theta_in_attention():
    attn = _attention_module("log")
    attn.train()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(9))
    out, penalty = attn(x)
    assert penalty is not None and float(penalty) > 0
    penalty.backward()
    assert attn.theta.grad.abs().sum() > 0 and attn.log_temperature.grad.abs().sum() > 0
