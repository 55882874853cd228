"""Hugging Face export end to end: checkpoints of every variant saved under TP2, ZeRO-3 (DP4) and
TP2 x PP2 by real DeepSpeed engines (one 4-process launch, tests/e2e/variant_checkpoints.py) are
exported, loaded with transformers and compared with the live model's outputs; folding, generate()
with and without the KV cache, attentions, the tokenizer, the CLI tools, and GPT-2 -> checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, base_env, free_port
from tests.e2e.test_checkpoint import run_tool

HELPER = REPO / "tests/e2e/variant_checkpoints.py"
HAS_PP = (REPO / "megatron_entropy/training/pipeline.py").exists()
LAYOUTS = ["tp2:2:1:0", "zero3:1:1:3"] + (["tp2pp2:2:2:0"] if HAS_PP else [])
TOLERANCE = 1e-5  # max |difference| / max |reference|, fp32


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant).strip("-").lower()


def training_tokenizer(data_cache: Path) -> Path:
    return next((data_cache / "megatron_entropy").rglob("tokenizer.model"))


def valid_prefix(data_cache: Path) -> str:
    return str(next((data_cache / "megatron_entropy").rglob("valid.json")).with_suffix(""))


@pytest.fixture(scope="module")
def variant_ckpts(data_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("variants")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(free_port()),
           str(HELPER), str(out), str(training_tokenizer(data_cache)), *LAYOUTS]
    proc = subprocess.run(cmd, env=base_env(data_cache), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def exports(variant_ckpts, tmp_path_factory) -> dict:
    """(layout, variant slug, folded) -> (HF directory, export summary, reference tensors)."""
    from safetensors.torch import load_file

    from megatron_entropy.hf.export import export_checkpoint

    root = tmp_path_factory.mktemp("hf")
    result = {}
    for ref_file in sorted(variant_ckpts.glob("*/*/reference.safetensors")):
        layout, variant = ref_file.parent.parent.name, ref_file.parent.name
        for fold in ((False, True) if layout == "tp2" else (False,)):  # folding is layout-independent
            out = root / f"{layout}-{variant}-{'folded' if fold else 'plain'}"
            summary = export_checkpoint(ref_file.parent / "checkpoints", out, fold=fold, say=lambda *_: None)
            result[layout, variant, fold] = (out, summary, load_file(str(ref_file)))
    return result


def load_hf(path: Path, remote: bool = True):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=remote, dtype=torch.float32).eval()


def test_every_variant_and_layout_matches_the_live_model(exports):
    """HF logits vs the TP2 / ZeRO-3 engine's logits (the TP2 x PP2 engine's loss), fp32."""
    import torch
    import torch.nn.functional as F

    from megatron_entropy.model.variants import VARIANTS

    worst, table = {}, []
    for (layout, variant, fold), (path, summary, ref) in exports.items():
        model = load_hf(path)
        with torch.no_grad():
            logits = model(ref["input_ids"]).logits.float()
        if "logits" in ref:
            assert logits.shape == ref["logits"].shape  # padded vocabulary stripped
            rel = float((logits - ref["logits"]).abs().max() / ref["logits"].abs().max())
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ref["labels"].reshape(-1))
            rel = abs(float(loss) - float(ref["loss"])) / abs(float(ref["loss"]))
        table.append(f"{layout:7s} {variant:20s} {'folded' if fold else 'plain ':6s} {summary['class']:35s} {rel:.2e}")
        worst[variant] = max(worst.get(variant, 0.0), rel)
        assert rel <= TOLERANCE, table[-1]
    print("\n" + "\n".join(table))
    print("max relative difference per variant:", json.dumps({k: f"{v:.1e}" for k, v in sorted(worst.items())}))
    assert set(worst) == {slug(v) for v in VARIANTS}


def test_baseline_is_a_native_gpt2_without_remote_code(exports):
    from transformers import GPT2LMHeadModel

    path, summary, _ = exports["tp2", "sm-ln-g", False]
    assert summary["class"] == "GPT2LMHeadModel"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert not list(path.glob("modeling_*.py")) and not list(path.glob("configuration_*.py"))
    assert isinstance(load_hf(path, remote=False), GPT2LMHeadModel)
    for layout, variant, _ in exports:
        if variant != "sm-ln-g":
            assert exports[layout, variant, False][1]["class"] == "MegatronEntropyForCausalLM"


GENERATE = ("ereg-sm-t--scfuffn", "sm-sn", "sm-ln-g")  # temperature + scaled/fused FFN, spectral norm, GPT-2


def test_generate_with_and_without_cache_and_attentions(exports):
    """Greedy generate() agrees with and without the KV cache; cached step-by-step logits equal the
    full forward (the temperature is indexed by the query's absolute position); attentions are causal."""
    import torch

    for (layout, variant, fold), (path, _, ref) in exports.items():
        if layout != "tp2":
            continue
        model = load_hf(path)
        with torch.no_grad():
            ids = ref["input_ids"][:, :12]
            full = model(ids).logits
            first = model(ids[:, :7], use_cache=True)
            cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
            step = model(ids[:, 7:8], cache=cache, use_cache=True).logits
            rest = model(ids[:, 8:], cache=cache, use_cache=True).logits
            cached = torch.cat([first.logits, step, rest], dim=1)
            rel = float((cached - full).abs().max() / full.abs().max())
            assert rel <= TOLERANCE, (variant, fold, rel)
            if variant in GENERATE:
                prompt = ref["input_ids"][:1, :5]
                with_cache = model.generate(prompt, max_length=13, do_sample=False, use_cache=True)
                without = model.generate(prompt, max_length=13, do_sample=False, use_cache=False)
                assert with_cache.shape == (1, 13) and torch.equal(with_cache, without), (variant, fold)
            if variant != "sm-ln-g":  # GPT-2's own attention outputs are transformers' business
                out = model(ids, output_attentions=True)
                assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 12, 12)
                probs = out.attentions[1]
                assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 12), atol=1e-5)
                assert float(probs.triu(diagonal=1).abs().max()) == 0.0


def test_tokenizer_encodes_exactly_like_training(exports, data_cache):
    from transformers import AutoTokenizer

    from megatron_entropy.data.tokenizer import load_tokenizer

    ours = load_tokenizer(training_tokenizer(data_cache))
    for key in (("tp2", "sm-ln-g", False), ("tp2", "ereg-sm-t--scfuffn", True)):
        path = exports[key][0]
        assert (path / "tokenizer.model").is_file()
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        for text in ("def f(x):\n    return x + 1\n", "  leading spaces\tand tabs\n\n", "</s><s> literal specials",
                     "unicode: héllo wörld ☃ 日本 🙂", "digits 1234567890 3.14159", ""):
            ids = hf(text)["input_ids"]
            assert ids == ours.encode(text), text
            assert hf.decode(ids) == text == ours.decode(ids)
        assert hf.eos_token_id == ours.eos_id and len(hf) == ours.vocab_size


def test_convert_to_hf_and_eval_ppl_tools(variant_ckpts, data_cache, tmp_path):
    layout = "tp2pp2" if HAS_PP else "tp2"
    ckpt = variant_ckpts / layout / "ereg-sm-t--scfuffn" / "checkpoints"
    out = tmp_path / "hf"
    env = base_env(data_cache)
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(ckpt), str(out), "--fold"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = [line for line in proc.stdout.splitlines() if line.startswith("check:")]
    assert check and float(check[0].rsplit("=", 1)[1]) <= TOLERANCE, proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "tools/eval_ppl.py"), str(out), "--data",
                           valid_prefix(data_cache), "--max-samples", "6", "--batch-size", "4", "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval_ppl" in proc.stderr  # the progress bar
    hf_result = json.loads(proc.stdout.strip().splitlines()[-1])
    code, stdout, _ = run_tool("eval_ppl.py", [str(ckpt), "--data", valid_prefix(data_cache), "--max-samples", "6",
                                               "--json", "--no-progress"])
    assert code == 0
    ours = json.loads(stdout.strip().splitlines()[-1])
    assert ours["tokens"] == hf_result["tokens"] == 6 * 16
    assert math.isclose(ours["loss"], hf_result["loss"], rel_tol=TOLERANCE)
    assert ours["perplexity"] > 1


def test_gpt2_imports_exports_back_and_trains(data_cache, tmp_path, run_train):
    """GPT2LMHeadModel dir -> convert_from_hf -> checkpoint -> convert_to_hf: the same logits; and
    train.py continues from the imported checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import SMALL_MODEL

    dims = dict(zip(SMALL_MODEL[::2], SMALL_MODEL[1::2]))
    config = GPT2Config(vocab_size=512, n_positions=int(dims["--model.seq_length"]),
                        n_embd=int(dims["--model.hidden_size"]), n_layer=int(dims["--model.num_layers"]),
                        n_head=int(dims["--model.num_heads"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(config).eval()
    d = config.n_embd
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for block in gpt2.transformer.h:  # SM+LN+G has no V, O or FFN biases: make them zero here
            block.attn.c_attn.bias[2 * d:] = 0
            block.attn.c_proj.bias.zero_()
            block.mlp.c_fc.bias.zero_()
            block.mlp.c_proj.bias.zero_()
    source = tmp_path / "gpt2"
    gpt2.save_pretrained(str(source))
    env = base_env(data_cache)
    imported = tmp_path / "imported"
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_from_hf.py"), str(source), str(imported)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: dropped" not in proc.stdout
    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(imported), str(exported),
                           "--no-check"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = GPT2LMHeadModel.from_pretrained(str(exported)).eval()
    ids = torch.randint(0, 512, (2, config.n_positions), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = gpt2(ids).logits, back(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= TOLERANCE

    run = run_train(["--model.variant", "SM+LN+G", "--train.resume", str(imported), "--train.max_steps", "2",
                     "--logging.log_interval", "1", "--train.global_batch_size", "4", "--train.micro_batch_size",
                     "4", "--train.eval_iters", "1", "--train.save_dir", ""])
    assert "resuming weights only" in run.proc.stdout
    assert [r["step"] for r in run.kind("train")] == [1, 2]
    assert all(math.isfinite(r["lm_loss"]) for r in run.kind("train"))
