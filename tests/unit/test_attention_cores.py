"""The attention cores inside the model: fused training matches eager, core selection and
fallback, and the model-FLOPs count behind the logged MFU."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch

import megatron_entropy.model.attention as attention
from megatron_entropy.analysis.flops import forward_flops, throughput, training_flops_per_token
from megatron_entropy.config import build_config
from megatron_entropy.model.gpt import GPTModel, parameter_groups


def model_config(core: str, variant: str = "EReg(SM(t)+ScFuFFN)", **overrides):
    args = ["--model.variant", variant, "--model.attention_core", core, "--model.num_layers", "2",
            "--model.hidden_size", "32", "--model.num_heads", "4", "--model.seq_length", "160",
            "--model.vocab_size", "96", "--model.make_vocab_size_divisible_by", "1",
            # O(1) logits (not near-uniform rows) and a penalty large enough to matter in the
            # gradients. No Q/K bias: the exact gradient of K's bias is 0 (a constant added to every
            # key shifts each row's scores by a constant), and Adam turns the rounding noise of a
            # zero gradient into full +-lr steps, whichever core computed it.
            "--model.init_std", "0.2", "--model.qk_bias", "false",
            "--model.temperature_init", "0.3", "--model.entropy_reg_coeff", "0.05",
            "--model.entropy_threshold_init", "0.9"]
    for key, value in overrides.items():
        args += [f"--model.{key}", str(value)]
    return build_config("tiny", args).model


def train(core: str, steps: int = 4):
    torch.manual_seed(0)
    model = GPTModel(model_config(core), seed=7)
    model.aux_scale.value = 1.0
    model.stats.active = True  # also checks that the logged entropies agree
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 161), generator=g)  # one batch, seen every step
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    entropy = model.stats.entropy_sum / model.stats.count
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, entropy


def test_fused_training_matches_eager():
    """4 AdamW steps of a 2-layer EReg model, T = 160 (two blocks of the fused core, the last one
    ragged), fp32: losses, every parameter and the logged entropies agree to ~1e-5 (measured:
    losses identical to 1e-7, parameters <= 7e-7). One exception, for the reason given in
    model_config: the temperature of position 0, whose row has one key, so its exact gradient is 0."""
    attention._warned.clear()
    calls = []
    original = attention.select_core

    def spy(name, q, need_entropy, temperature_grad=False):
        calls.append(original(name, q, need_entropy, temperature_grad))
        return calls[-1]

    attention.select_core = spy
    try:
        fused = train("fused")
        fused_calls, calls[:] = list(calls), []
        eager = train("eager")
    finally:
        attention.select_core = original
    assert set(fused_calls) == {"fused"} and set(calls) == {"eager"}
    for a, b in zip(fused[0], eager[0]):
        assert a == pytest.approx(b, rel=1e-5)
    assert fused[0][-1] < fused[0][0]  # it trains
    for name, p in fused[1].items():
        q = eager[1][name]
        if name.endswith("log_temperature"):
            p, q = p[:, 1:], q[:, 1:]
        err = ((p - q).abs().max() / q.abs().max().clamp_min(1e-3)).item()
        assert err < 1e-5, (name, err)
    assert torch.allclose(fused[2], eager[2], rtol=1e-5, atol=1e-6)
    # the penalty did move its parameters: theta left its initial value
    assert not torch.allclose(fused[1]["layers.0.attention.theta"], torch.full((4,), 0.9))


def qkv(T: int, b: int = 1, h: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(b, h, T, d, generator=g) * 0.5 for _ in range(3)]


def test_auto_picks_the_expected_core():
    attention._warned.clear()
    short, long = qkv(attention.FUSED_AUTO_MIN_SEQ - 1)[0], qkv(attention.FUSED_AUTO_MIN_SEQ)[0]
    cuda_like = SimpleNamespace(is_cuda=True, shape=(1, 2, 8, 8))  # select_core reads only these
    assert attention.select_core("auto", short, need_entropy=True) == "eager"
    assert attention.select_core("auto", long, need_entropy=True) == "fused"
    assert attention.select_core("auto", cuda_like, need_entropy=True) == "fused"
    for name in ("auto", "eager", "fused"):  # no entropy wanted: PyTorch SDPA whatever the setting
        assert attention.select_core(name, long, need_entropy=False) == "sdpa"
    assert attention.select_core("eager", long, need_entropy=True) == "eager"
    assert attention.select_core("fused", short, need_entropy=True) == "fused"


def test_fused_falls_back_to_eager_and_says_so_once(monkeypatch, caplog):
    """Without the fused module (here: its import fails) attention_core=fused runs the eager core
    and logs one warning however often it is called; a step without entropy says 'SDPA' once."""
    attention._warned.clear()
    monkeypatch.setitem(sys.modules, "megatron_entropy.model.fused_attention", None)  # import -> ImportError
    q, k, v = qkv(40)
    with caplog.at_level(logging.INFO, logger=attention.log.name):
        for _ in range(3):
            assert attention.select_core("fused", q, need_entropy=True) == "eager"
            context, entropy = attention.attention_core("fused", q, k, v, need_entropy=True)
            want = attention.eager_core(q, k, v, causal=True, need_entropy=True)
            assert torch.equal(context, want[0]) and torch.equal(entropy, want[1])
        for _ in range(2):
            context, entropy = attention.attention_core("fused", q, k, v, need_entropy=False)
            assert entropy is None
    messages = [r.getMessage() for r in caplog.records]
    fallback = [m for m in messages if "falling back to eager" in m]
    sdpa = [m for m in messages if "using SDPA" in m]
    assert len(fallback) == 1 and len(sdpa) == 1, messages
    assert [r.levelno for r in caplog.records if "falling back" in r.getMessage()] == [logging.WARNING]
    attention._warned.clear()


def test_model_uses_the_fused_core_with_the_right_maths():
    """One forward of the model with each core, stats on: same loss, same entropies."""
    out = {}
    for core in ("eager", "fused"):
        model = GPTModel(model_config(core), seed=3)
        model.stats.active = True
        tokens = torch.randint(0, 96, (2, 161), generator=torch.Generator().manual_seed(0))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        out[core] = (float(loss.detach()), model.stats.entropy_sum.clone())
    assert out["fused"][0] == pytest.approx(out["eager"][0], rel=1e-6)
    assert torch.allclose(out["fused"][1], out["eager"][1], rtol=1e-5)


def test_flops_per_token_follow_the_variant():
    """By hand: L = 2, d = 64, T = 32, V = 100 (paper section 6.8, forward; training = 3x)."""
    L, d, T, V = 2, 64, 32, 100
    attn = 8 * T * d * d * L + 3 * T * T * d * L  # 2,097,152 + 393,216
    head = 2 * T * d * V  # 409,600
    assert attn == 2_490_368 and head == 409_600
    common = ["--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_heads", "4",
              "--model.seq_length", "32", "--model.vocab_size", "100"]
    two_layer = build_config("tiny", common + ["--model.variant", "SM+LN+G"]).model
    fused = build_config("tiny", common + ["--model.variant", "EReg(SM(t)+ScFuFFN)"]).model
    wide = build_config("tiny", common + ["--model.variant", "SM+LN+R", "--model.ffn_hidden_size", "128"]).model
    # two-layer FFN d -> 4d -> d: 2 matmuls x 2 T d (4d) x L = 4,194,304
    assert forward_flops(two_layer) == attn + 4_194_304 + head == 7_094_272
    assert training_flops_per_token(two_layer) == 3 * 7_094_272 / 32 == 665_088
    # fused d x d FFN: 2 T d^2 L = 524,288 (8x fewer FFN FLOPs)
    assert forward_flops(fused) == attn + 524_288 + head == 3_424_256
    assert training_flops_per_token(fused) == 3 * 3_424_256 / 32 == 321_024
    # ffn_hidden_size is honoured: 4 T d 128 L = 2,097,152
    assert forward_flops(wide) == attn + 2_097_152 + head
    # another sequence length: the T^2 term grows quadratically, the rest linearly
    assert forward_flops(fused, seq_length=64) == 2 * (8 * 32 * d * d * L + 524_288 + head) + 3 * 64 * 64 * d * L


def test_throughput_and_mfu():
    assert throughput(321_024, 1e6, 1, None) == {}
    got = throughput(6e9, 50_000, 4, 989.0)  # 6 GFLOP/token x 50k tok/s over 4 devices = 75 TFLOP/s each
    assert got["tflops"] == pytest.approx(75.0)
    assert got["mfu"] == pytest.approx(75.0 / 989.0)


def test_fused_core_threads_split_rows_exactly():
    """With N > 1 intra-op threads and T >= PARALLEL_MIN_SEQ the CPU fused core runs batch*head
    ranges in N Python threads (one intra-op thread each): the same results (to rounding: each
    thread's batched matmuls see fewer batch entries), and the caller's thread count is restored."""
    from megatron_entropy.model import fused_attention as fa

    T = fa.PARALLEL_MIN_SEQ + 44  # ragged last block
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g = torch.Generator().manual_seed(0)
            leaves = [torch.randn(2, T, 3 * 8, generator=g).requires_grad_() for _ in range(3)]
            q, k, v = [x.view(2, T, 3, 8).transpose(1, 2) for x in leaves]  # the model's layout
            context, entropy = fa.blocked_entropy_attention(q, k, v, causal=True, block_size=128)
            (context.transpose(1, 2).reshape(2, T, 24).square().sum() + entropy.square().sum()).backward()
            assert torch.get_num_threads() == threads
            results[threads] = [context.detach(), entropy.detach()] + [x.grad for x in leaves]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[1], results[2]):  # same maths; MKL may round a smaller batch differently
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
