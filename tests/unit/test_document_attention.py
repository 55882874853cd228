"""Document attention (data.document_attention=within) through every attention core and the model:
the cores agree with each other, and a packed batch equals running each document alone --
context, entropy, logits and gradients, in fp32 -- with positions and temperature rows restarted."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_entropy.config import build_config
from megatron_entropy.model import attention
from megatron_entropy.model.attention import attention_core, eager_core, sdpa_core
from megatron_entropy.model.fused_attention import blocked_entropy_attention
from megatron_entropy.model.gpt import GPTModel

# Two samples of T = 40: boundaries inside and on the edges of 16-token blocks, a one-token document.
LENGTHS = [[1, 16, 17, 6], [25, 15]]


def doc_start_of(lengths_per_sample) -> torch.Tensor:
    rows = []
    for lengths in lengths_per_sample:
        row, position = [], 0
        for n in lengths:
            row += [position] * n
            position += n
        rows.append(row)
    return torch.tensor(rows)


def fused(q, k, v, doc_start=None):
    return blocked_entropy_attention(q, k, v, causal=True, block_size=16, doc_start=doc_start)


def eager(q, k, v, doc_start=None):
    return eager_core(q, k, v, causal=True, doc_start=doc_start)


def sdpa(q, k, v, doc_start=None):
    return sdpa_core(q, k, v, causal=True, doc_start=doc_start)


CORES = {"eager": eager, "fused": fused, "sdpa": sdpa}


def run_core(core, inputs, weights, doc_start=None):
    """(context, entropy | None, dq, dk, dv) for loss <w, context> + <w', entropy>."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    context, entropy = core(*leaves, doc_start=doc_start)
    loss = (context * weights[0]).sum() + (0 if entropy is None else (entropy * weights[1]).sum())
    loss.backward()
    return [context.detach(), None if entropy is None else entropy.detach()] + [x.grad for x in leaves]


def random_inputs(b, h, T, d, t0=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, T, d, generator=g) for _ in range(3))
    weights = (torch.randn(b, h, T, d, generator=g), torch.randn(b, h, T, generator=g))
    return (q / (t0 * math.sqrt(d)), k, v), weights


def relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("name", sorted(CORES))
def test_core_on_packed_documents_equals_each_document_alone(name):
    core = CORES[name]
    T = sum(LENGTHS[0])
    inputs, weights = random_inputs(len(LENGTHS), 2, T, 8)
    packed = run_core(core, inputs, weights, doc_start_of(LENGTHS))
    for row, lengths in enumerate(LENGTHS):
        position = 0
        for n in lengths:
            part = slice(position, position + n)
            alone = run_core(core, [x[row:row + 1, :, part] for x in inputs],
                             [w[row:row + 1, :, part] for w in weights])
            for label, got, want in zip(("context", "entropy", "dq", "dk", "dv"), packed, alone):
                if want is None:
                    continue
                err = relative_error(got[row:row + 1, :, part], want)
                assert err < 2e-5, (name, label, row, position, err)
            position += n


def test_cores_agree_on_documents():
    """Eager (the reference), fused and SDPA: context, entropy and gradients, fp32."""
    T = sum(LENGTHS[0])
    inputs, weights = random_inputs(len(LENGTHS), 3, T, 16, seed=3)
    doc_start = doc_start_of(LENGTHS)
    reference = run_core(eager, inputs, weights, doc_start)
    for name in ("fused", "sdpa"):
        # SDPA returns no entropy: compare it on the context part of the loss only.
        w = weights if name == "fused" else (weights[0], torch.zeros_like(weights[1]))
        want = reference if name == "fused" else run_core(eager, inputs, w, doc_start)
        got = run_core(CORES[name], inputs, w, doc_start)
        for label, a, b in zip(("context", "entropy", "dq", "dk", "dv"), got, want):
            if a is not None:
                assert relative_error(a, b) < 2e-5, (name, label)
    # A document mask that is the whole sample is plain causal attention.
    whole = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for got, want in zip(run_core(eager, inputs, weights, whole), run_core(eager, inputs, weights)):
        assert torch.equal(got, want)


def model(core: str, seq_length: int):
    args = ["--model.variant", "SM(t)+ScFuFFN", "--model.attention_core", core, "--model.num_layers", "2",
            "--model.hidden_size", "32", "--model.num_heads", "4", "--model.seq_length", str(seq_length),
            "--model.vocab_size", "64", "--model.make_vocab_size_divisible_by", "1",
            "--model.init_std", "0.2", "--model.temperature_init", "0.3"]
    torch.manual_seed(0)
    gpt = GPTModel(build_config("tiny", args).model, seed=11)
    with torch.no_grad():  # distinct temperature rows, so a wrong row index shows
        gpt.layers[0].attention.log_temperature.add_(torch.linspace(-0.5, 0.5, seq_length))
    return gpt


@pytest.mark.parametrize("core", ["eager", "fused", "sdpa"])
def test_model_on_packed_documents_equals_each_document_alone(core, monkeypatch):
    """Logits and the gradient of the summed LM loss. Positions and temperature rows restart
    per document; `core` is the one select_core runs (training, temperature gradient, no entropy)."""
    calls = []
    select = attention.select_core
    monkeypatch.setattr(attention, "select_core", lambda *a, **k: calls.append(select(*a, **k)) or calls[-1])
    T = sum(LENGTHS[0])
    gpt = model(core, seq_length=T + 8)  # the table is longer than the batch: rows are indexed, not sliced
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (len(LENGTHS), T + 1), generator=g)

    def logits_and_grads(inputs, labels, doc_start=None):
        gpt.zero_grad(set_to_none=True)
        hidden = gpt.hidden_states(inputs, doc_start)
        logits = gpt.head.full_logits(hidden)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        return logits.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}

    packed_logits, packed_grads = logits_and_grads(tokens[:, :-1], tokens[:, 1:], doc_start_of(LENGTHS))
    summed = {n: torch.zeros_like(p) for n, p in packed_grads.items()}
    for row, lengths in enumerate(LENGTHS):
        position = 0
        for n in lengths:
            part = slice(position, position + n)
            logits, grads = logits_and_grads(tokens[row:row + 1, :-1][:, part], tokens[row:row + 1, 1:][:, part])
            assert relative_error(packed_logits[row:row + 1, part], logits) < 2e-5, (core, row, position)
            for name, grad in grads.items():
                summed[name] += grad
            position += n
    for name, grad in packed_grads.items():
        assert relative_error(grad, summed[name]) < 5e-5, (core, name)
    assert set(calls) == {core}


def test_attention_core_passes_documents_to_whichever_core_runs():
    inputs, _ = random_inputs(len(LENGTHS), 2, sum(LENGTHS[0]), 8, seed=9)
    doc_start = doc_start_of(LENGTHS)
    want, _ = eager(*inputs, doc_start=doc_start)
    for name, need_entropy, temperature_grad in (("eager", True, True), ("fused", True, True),
                                                 ("sdpa", False, True), ("auto", False, False)):
        context, _ = attention_core(name, *inputs, need_entropy=need_entropy,
                                    temperature_grad=temperature_grad, doc_start=doc_start)
        assert relative_error(context, want) < 2e-5, name


TRITON_SCRIPT = """
import torch
import megatron_entropy.model.fused_attention as fa
from megatron_entropy.model.attention import attention_core
from tests.unit.test_document_attention import LENGTHS, doc_start_of, eager, random_inputs, relative_error, run_core

fa._triton_eligible = lambda q: True  # stand-in for "a CUDA tensor": the Triton path on CPU tensors
fa._TRITON_VERDICT.clear()

def triton_core(q, k, v, doc_start=None):
    return attention_core("fused", q, k, v, need_entropy=True, temperature_grad=True, doc_start=doc_start)

inputs, weights = random_inputs(len(LENGTHS), 2, sum(LENGTHS[0]), 16, seed=3)
doc_start = doc_start_of(LENGTHS)
got = run_core(triton_core, inputs, weights, doc_start)
assert fa._TRITON_VERDICT and all(v is None for v in fa._TRITON_VERDICT.values()), fa._TRITON_VERDICT
want = run_core(eager, inputs, weights, doc_start)
errors = {name: relative_error(a, b) for name, a, b in zip(("context", "entropy", "dq", "dk", "dv"), got, want)}
assert max(errors.values()) < 2e-5, errors
print("TRITON_DOCUMENTS_THROUGH_ATTENTION_CORE_OK", {k: f"{v:.1e}" for k, v in errors.items()})
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_core_takes_documents_through_attention_core():
    """attention_core hands doc_start to the Triton kernels (under TRITON_INTERPRET on CPU tensors,
    a subprocess since it must be set before triton is imported): they agree with eager, fp32."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TRITON_DOCUMENTS_THROUGH_ATTENTION_CORE_OK" in proc.stdout, proc.stdout + proc.stderr
    print(proc.stdout.strip())


def test_activation_checkpointing_with_documents_is_bit_identical():
    from megatron_entropy.training.pipeline import set_activation_checkpointing

    T = sum(LENGTHS[0])
    tokens = torch.randint(0, 64, (len(LENGTHS), T + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        gpt = model("eager", seq_length=T).train()
        set_activation_checkpointing(gpt, checkpointing)
        loss = gpt(tokens[:, :-1], tokens[:, 1:], doc_start=doc_start_of(LENGTHS))
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in gpt.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_bad_document_options_are_one_line_config_errors():
    from megatron_entropy.config import ConfigError

    for key, value, message in (("document_attention", "inside", "must be cross or within"),
                                ("packing", "docs", "must be stream or per_document")):
        with pytest.raises(ConfigError, match=message):
            build_config("tiny", [f"--data.{key}", value]).validate()
