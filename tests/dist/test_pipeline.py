"""Pipeline parallelism and 3D layouts: every layout trains exactly like one process (DESIGN decision 6).

For one global batch and seed (fp32, token_mean penalty), three optimizer steps of every layout —
DP, TP, PP, their products up to TP2 x PP2 x DP2 on 8 processes, ZeRO 0-3, other micro-batch
sizes and accumulation, activation checkpointing, both partition methods — log the same LM loss,
entropy penalty, gradient norm and [layers x heads] entropy matrix as the single-process run,
within 1e-5 relative. Settings are chosen so that differences would show: lr 1e-2 without warm-up,
init_std 0.1, temperature 0.1 (attention far from uniform), lambda 1e-2 with the reference token
count of one micro-batch (the penalty is O(LM loss)), and gradient norms above the clip of 1.0.

Document attention (data.document_attention=within, with data.eod_mask_loss) is checked the same
way on a corpus of short documents that the test writes in Megatron's .bin/.idx layout without
our sidecar (tests/megatron_layout.py; the tokenizer stands in for it): TP2, PP2 (the stages pass
(hidden, doc_start)), DP2, TP2 x PP2 and TP2 x PP2 x DP2 against one process.

All layouts of one world size run one after another in the same processes (tests/dist/pp_worker.py:
train_runs — train.py's own path, `training.loop.run`), so the whole matrix costs four spawns.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.dist.harness import spawn

ZERO = {stage: str(REPO / f"ds_configs/zero{stage}.json") for stage in range(4)}
REL = 1e-5

TINY = ["--model.num_layers", "4", "--model.hidden_size", "64", "--model.num_heads", "4", "--model.seq_length", "32",
        "--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512",
        "--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.max_steps", "3",
        "--logging.log_interval", "1", "--logging.wandb", "off", "--logging.progress_bar", "false",
        "--logging.figures", "false", "--train.save_dir", "", "--train.eval_iters", "1"]
SENSITIVE = ["--train.lr", "1e-2", "--train.warmup_steps", "0", "--model.init_std", "0.1",
             "--model.temperature_init", "0.1", "--model.entropy_reg_coeff", "1e-2",
             "--model.entropy_reference_tokens", "64"]

PP, TP, CKPT = "--parallel.pipeline", "--parallel.tensor", ["--parallel.activation_checkpointing", "true"]
UNIFORM = ["--parallel.pipeline_partition", "uniform"]
# LayerNorms and a final norm, GeLU FFN, an untied output layer (the pipeline's other head path).
LN_UNTIED = ["--model.variant", "SM+LN+G", "--model.tie_embeddings", "false"]


# "@documents" becomes --data.train_data/valid_data/tokenizer for the Megatron-layout corpus.
WITHIN = ["@documents", "--data.document_attention", "within", "--data.eod_mask_loss", "true"]
CROSS_ON_DOCUMENTS = "1 cross, same documents"


def mb(n: int) -> list[str]:
    return ["--train.micro_batch_size", str(n)]


# name -> (extra overrides, DeepSpeed config). DP is what is left: world / (TP x PP).
LAYOUTS: dict[int, dict[str, tuple[list[str], str | None]]] = {
    1: {
        "1": ([], None),
        "1 mb8 (GAS 1)": (mb(8), None),
        "1 mb1 (GAS 8)": (mb(1), None),
        "1 checkpointing": (CKPT, None),
        "1 SM+LN+G untied": (LN_UNTIED, None),
        "1 within": (WITHIN, None),
        CROSS_ON_DOCUMENTS: (["@documents"], None),
    },
    2: {
        "DP2": ([], None),
        "DP2 ZeRO-1": ([], ZERO[1]),
        "DP2 ZeRO-2": ([], ZERO[2]),
        "DP2 ZeRO-3": ([], ZERO[3]),
        "DP2 mb4 (GAS 1)": (mb(4), None),
        "TP2": ([TP, "2"], None),
        "PP2": ([PP, "2"], None),
        "PP2 ZeRO-1": ([PP, "2"], ZERO[1]),
        "PP2 mb1 (GAS 8) uniform checkpointing": ([PP, "2", *mb(1), *UNIFORM, *CKPT], None),
        "PP2 SM+LN+G untied": ([PP, "2", *LN_UNTIED], None),
        "DP2 within": (WITHIN, None),
        "TP2 within": ([TP, "2", *WITHIN], None),
        "PP2 within": ([PP, "2", *WITHIN], None),
    },
    4: {
        "DP2xPP2": ([PP, "2"], None),
        "DP2xPP2 mb4 (GAS 1 < 2 stages)": ([PP, "2", *mb(4)], None),
        "TP2xPP2": ([TP, "2", PP, "2"], None),
        "TP2xDP2": ([TP, "2"], None),
        "PP4 uniform checkpointing ZeRO-1": ([PP, "4", *UNIFORM, *CKPT], ZERO[1]),
        "TP2xPP2 SM+LN+G untied": ([TP, "2", PP, "2", *LN_UNTIED], None),
        "TP2xPP2 within": ([TP, "2", PP, "2", *WITHIN], None),
    },
    8: {
        "TP2xPP2xDP2": ([TP, "2", PP, "2"], None),
        "TP2xPP2xDP2 mb1 (GAS 4) checkpointing ZeRO-1": ([TP, "2", PP, "2", *mb(1), *CKPT], ZERO[1]),
        "TP2xPP2xDP2 within": ([TP, "2", PP, "2", *WITHIN], None),
    },
}
# Expected to be refused inside the run (all ranks, same one-line ConfigError): on the tiny model,
# "parameters" partitioning puts the embedding alone on stage 0, which would hang ZeRO-1.
REFUSED_IN_RUN = {4: {"PP4 parameters ZeRO-1 (embedding-only stage)": ([PP, "4"], ZERO[1])}}


def extension_cache() -> str:
    """The already-compiled DeepSpeed ops (XDG_CACHE_HOME is redirected to the test data cache)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")


def dist_env(data_cache: Path) -> dict:
    return {"XDG_CACHE_HOME": str(data_cache), "TORCH_EXTENSIONS_DIR": extension_cache()}


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_differences(run: list[dict], ref: list[dict]) -> dict[str, float]:
    """Largest relative difference of each logged quantity over the steps (entropy: every head)."""
    assert [r["step"] for r in run] == [r["step"] for r in ref] == [1, 2, 3]
    worst = {"lm_loss": 0.0, "entropy_reg_loss": 0.0, "grad_norm": 0.0, "entropy": 0.0}
    for r, q in zip(run, ref):
        for key in ("lm_loss", "entropy_reg_loss", "grad_norm"):
            worst[key] = max(worst[key], rel(r[key], q[key]))
        a, b = torch.tensor(r["entropy"], dtype=torch.float64), torch.tensor(q["entropy"], dtype=torch.float64)
        assert a.shape == b.shape == (4, 4) and not torch.isnan(a).any()
        worst["entropy"] = max(worst["entropy"], float(((a - b).abs() / b.abs()).max()))
    return worst


def megatron_documents(root: Path, data_cache: Path) -> list[str]:
    """Short documents (3-40 tokens, T = 32: several per sample) of the default corpus' tokens in
    Megatron's layout, no sidecar."""
    from tests.megatron_layout import read_megatron, short_documents, write_megatron

    tokenizer = next((data_cache / "megatron_entropy").rglob("tokenizer.model"))
    text = read_megatron(str(tokenizer.parent / "train"))["tokens"]
    write_megatron(str(root / "documents"), short_documents(600, 512, eos_id=2, seed=4, source=text))
    prefix = str(root / "documents")
    return ["--data.train_data", prefix, "--data.valid_data", prefix, "--data.tokenizer", str(tokenizer)]


@pytest.fixture(scope="module")
def layout_runs(data_cache, tmp_path_factory) -> dict:
    """Run every layout; returns {name: {"records": [...], "seconds": s, "stdout": rank 0's}}."""
    root = tmp_path_factory.mktemp("layouts")
    documents = megatron_documents(root, data_cache)
    out = {}
    for world, layouts in LAYOUTS.items():
        refused = REFUSED_IN_RUN.get(world, {})
        runs, names = [], []
        for name, (extra, ds) in {**layouts, **refused}.items():
            run_dir = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("<", "lt")
            extra = [arg for word in extra for arg in (documents if word == "@documents" else [word])]
            runs.append({"args": TINY + SENSITIVE + extra + ["--logging.run_dir", str(run_dir)], "deepspeed": ds,
                         "expect_error": name in refused})
            names.append((name, run_dir))
        results = spawn("tests/dist/pp_worker.py:train_runs", world, kwargs={"runs": runs}, timeout=420,
                        env=dist_env(data_cache), work_dir=root / f"world{world}")
        for (name, run_dir), result in zip(names, results[0].result):
            out[name] = dict(result, records=records(run_dir) if not result.get("error") else None,
                             stdout=results[0].stdout)
    return out


def reference(name: str) -> str:
    return "1 SM+LN+G untied" if "SM+LN+G untied" in name else "1 within" if "within" in name else "1"


@pytest.mark.parametrize("name", [n for layouts in LAYOUTS.values() for n in layouts
                                  if n != reference(n) and n != CROSS_ON_DOCUMENTS])
def test_layout_matches_single_process(layout_runs, name):
    diffs = max_differences(layout_runs[name]["records"], layout_runs[reference(name)]["records"])
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(v <= REL for v in diffs.values()), (name, diffs)


def test_the_comparison_is_sensitive(layout_runs):
    """The settings exercise clipping and a penalty of the LM loss' order, and training moves."""
    ref = layout_runs["1"]["records"]
    assert all(r["grad_norm"] > 1.0 for r in ref)  # clipping (train.grad_clip 1.0) is active
    assert all(r["entropy_reg_loss"] > 0.1 for r in ref)
    assert abs(ref[2]["lm_loss"] - ref[0]["lm_loss"]) > 0.05


def test_document_attention_changes_training(layout_runs):
    """`within` is not `cross` on the same documents: the layouts above compare a real difference."""
    within, cross = layout_runs["1 within"]["records"], layout_runs[CROSS_ON_DOCUMENTS]["records"]
    assert max(rel(a["lm_loss"], b["lm_loss"]) for a, b in zip(within, cross)) > 1e-3
    assert max_differences(within, cross)["entropy"] > 1e-2


def test_fewer_micro_batches_than_stages_runs_and_says_so(layout_runs):
    """DeepSpeed's 1F1B schedule needs no M >= S; the run works (layout test above) and notes the bubble."""
    out = layout_runs["DP2xPP2 mb4 (GAS 1 < 2 stages)"]["stdout"]
    assert "pipeline: 1 micro-batches per step on 2 stages (1F1B): each stage idles 50% of a step" in out
    assert "fewer micro-batches than stages works" in out


def test_zero1_with_an_embedding_only_stage_is_refused(layout_runs):
    error = layout_runs["PP4 parameters ZeRO-1 (embedding-only stage)"]["error"]
    assert error.startswith("ZeRO-1 with parallel.pipeline=4: some pipeline stages hold only weight-decayed")
    assert "--parallel.pipeline_partition uniform" in error and "\n" not in error


def test_tied_embedding_and_all_gradients_match_pp1_with_and_without_checkpointing(data_cache):
    """One train_batch through DeepSpeed's 1F1B on 2 stages, gradients captured before the step,
    against a single-process GPTModel on the same micro-batches. Spectral norm on every linear
    layer, learnable temperature and the entropy penalty, so the recompute must neither repeat
    the power iteration nor see buffers that later micro-batches' forwards already advanced."""
    model_args = dict(variant="SM+SN", stabilizer_placement="QKVO+FFN", learnable_temperature=True,
                      entropy_reg=True, num_layers=4, hidden_size=32, num_heads=4, seq_length=16, vocab_size=100,
                      entropy_reg_coeff=1e-2, entropy_reference_tokens=32, init_std=0.1, temperature_init=0.1,
                      attention_core="eager")
    results = spawn("tests/dist/pp_worker.py:pipeline_grads", 2, timeout=240, env=dist_env(data_cache),
                    kwargs=dict(model_args=model_args, micro_batch_size=2, global_batch=8,
                                checkpointing=[False, True]))
    cases = results[0].result["cases"]
    assert set(cases) == {"checkpointing=False", "checkpointing=True"}
    for name, case in cases.items():
        assert case["missing"] == [], name
        assert math.isclose(case["loss"], case["ref_loss"], rel_tol=1e-6), (name, case)
        assert case["max_rel"] < 1e-6, (name, case["worst"], case["max_rel"])
        # the tied embedding's gradient (its own use + the head's) on both stages that hold it
        assert set(case["tied"]) == {"stage0", "stage1"} and max(case["tied"].values()) < 1e-6, case["tied"]
        assert case["tied_norm"] > 0
    assert cases["checkpointing=True"]["max_abs_vs_first_case"] == 0.0  # recompute is bit-identical


def test_checkpointing_single_process_is_bit_identical():
    """Several forwards before their backwards (as a pipeline stage does): checkpointed layers give
    the same loss, gradients, power-iteration vectors and entropy statistics as plain ones."""
    from megatron_entropy.config import ModelConfig
    from megatron_entropy.model.gpt import GPTModel
    from megatron_entropy.training.pipeline import set_activation_checkpointing

    cfg = ModelConfig(variant="SM+SN", stabilizer_placement="QKVO+FFN", learnable_temperature=True,
                      entropy_reg=True, num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=100,
                      make_vocab_size_divisible_by=1, entropy_reg_coeff=1e-2, entropy_reference_tokens=32,
                      init_std=0.1, temperature_init=0.1, attention_core="eager")

    def run(checkpointing: bool):
        model = GPTModel(cfg, seed=3).train()
        set_activation_checkpointing(model, checkpointing)
        model.stats.active = True
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 100, (2, 17), generator=g) for _ in range(3)]
        losses = [model(b[:, :-1], b[:, 1:]) for b in batches]
        for loss in losses:
            loss.backward()
        return model, [float(loss.detach()) for loss in losses]

    plain, plain_losses = run(False)
    ckpt, ckpt_losses = run(True)
    assert plain_losses == ckpt_losses
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), name
    assert torch.equal(plain.stats.entropy_sum, ckpt.stats.entropy_sum)
    assert torch.equal(plain.stats.count, ckpt.stats.count) and float(ckpt.stats.count.sum()) == 3 * 2 * 16 * 2 * 4
    assert float(plain.stats.penalty) == float(ckpt.stats.penalty)


REFUSED = {
    "ZeRO-2 with PP": ([PP, "2", "--deepspeed", ZERO[2]], 2, "ZeRO stage 2 cannot be combined with pipeline parallelism"),
    "ZeRO-3 with PP": ([PP, "2", "--deepspeed", ZERO[3]], 4, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
    "world 6, TP2 x PP2": ([TP, "2", PP, "2"], 6, "world size 6 is not a multiple of parallel.tensor x parallel.pipeline = 4"),
    "world 3, TP2": ([TP, "2"], 3, "world size 3 is not a multiple of parallel.tensor x parallel.pipeline = 2"),
    "world 2, PP4": ([PP, "4"], 2, "parallel.tensor x parallel.pipeline = 4 exceeds the world size 2"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_combinations_exit_2_with_one_line(monkeypatch, capsys, tmp_path, name):
    """train.py's main() with the launcher's WORLD_SIZE: these are checked before any process group
    exists (so every rank says the same), hence one process shows what each rank would print."""
    import train

    args, world, message = REFUSED[name]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert train.main([*TINY, *args, "--logging.run_dir", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
