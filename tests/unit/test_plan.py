"""The layout planner (analysis/plan.py) against the real model, DeepSpeed's partitioner and the
tensors autograd saves; tools/plan.py on every preset; train.py --dry-run at the Slurm layout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_entropy.analysis import plan
from megatron_entropy.analysis.plan_report import report
from megatron_entropy.config import CONFIG_DIR, build_config
from megatron_entropy.model.gpt import GPTModel
from megatron_entropy.parallel.state import ParallelState

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--model.num_layers", "3", "--model.hidden_size", "64", "--model.num_heads", "4", "--model.seq_length", "128",
         "--model.vocab_size", "300"]


def small_config(variant: str, *extra: str):
    return build_config("tiny", SMALL + ["--model.variant", variant, *extra])


@pytest.mark.parametrize("variant, extra", [
    ("EReg(SM(t)+ScFuFFN)", []), ("SM+LN+G", []), ("SM+LN", ["--model.tie_embeddings", "false"]),
    ("SM+WN", ["--model.stabilizer_placement", "QKVO+FFN"]), ("SM+SN", []), ("SM+ScFFN", ["--model.qk_bias", "false"]),
])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parameters_per_rank_match_the_model(variant, extra, tp):
    cfg = small_config(variant, *extra)
    shape = plan.ModelShape.from_model_config(cfg.model)
    for rank in range(tp):
        with torch.device("meta"):  # full shapes, no storage
            model = GPTModel(cfg.model, ParallelState(world_size=tp, tp_size=tp, tp_rank=rank))
        assert sum(p.numel() for p in model.parameters()) == plan.stage_params(shape, tp, 1)[0]
    if tp == 1:
        assert sum(p.numel() for p in model.parameters()) == plan.total_params(shape)


def test_pipeline_partition_is_deepspeeds():
    from deepspeed.runtime.utils import partition_balanced

    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = rng.integers(0, 50, size=int(rng.integers(2, 30))).tolist()
        parts = int(rng.integers(1, 9))
        assert plan._partition_balanced(weights, parts) == list(partition_balanced(weights, parts))
    shape = plan.ModelShape.from_model_config(build_config("1b", ["--model.vocab_size", "4096"]).model)
    for pp in (2, 4, 8):
        stages = plan.stage_params(shape, 2, pp)
        # Every parameter is on one stage, the tied embedding on both ends.
        assert sum(stages) == plan.stage_params(shape, 2, 1)[0] + plan.embedding_params(shape, 2)
        assert sum(plan.stage_layers(shape, 2, pp, "uniform")) == 28


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    return sum(seen.values())


@pytest.mark.parametrize("variant, core, precision, micro", [
    ("EReg(SM(t)+ScFuFFN)", "fused", "fp32", 2), ("EReg(SM(t)+ScFuFFN)", "fused", "bf16", 3),
    ("EReg(SM(t)+ScFuFFN)", "eager", "fp32", 2), ("EReg(SM(t)+ScFuFFN)", "eager", "bf16", 1),
    ("SM+LN+G", "fused", "fp32", 2),  # no entropy, no temperature: SDPA runs
    ("SM(t)+ScFuFFN", "fused", "fp32", 2),  # temperature gradient without the penalty: the fused core
])
def test_activation_count_matches_the_saved_tensors(variant, core, precision, micro):
    cfg = small_config(variant, "--model.attention_core", core)
    torch.manual_seed(0)
    model = GPTModel(cfg.model).to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    ids = torch.randint(0, 300, (micro, 128))
    measured = saved_activation_bytes(model, ids)
    lay = plan.Layout(micro_batch=micro, global_batch=micro, precision=precision, core=core, device="cpu")
    acts = plan.activation_bytes(plan.ModelShape.from_model_config(cfg.model), lay, layers=3)
    predicted = acts["layers"] + acts["head"]
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


def test_model_state_bytes_follow_the_zero_table():
    n, lay = 1000, plan.Layout(nodes=1, gpus_per_node=4, zero=0, micro_batch=1, global_batch=4)
    by_zero = [plan.model_state_bytes(n, plan.Layout(**{**lay.__dict__, "zero": z}), 10) for z in range(4)]
    totals = [sum(v for k, v in s.items() if k not in ("host", "lp_grads")) for s in by_zero]
    assert [s["lp_grads"] for s in by_zero] == [2 * n, 2 * n, 2 * n // 4, 2 * n // 4]  # cleared every step
    bucket = n * 2
    assert totals[0] == 2 * n + 2 * n + 4 * n + 12 * n
    assert totals[1] == 2 * n + 2 * n + 16 * n // 4
    assert totals[2] == 2 * n + 2 * n // 4 + 16 * n // 4 + bucket
    assert totals[3] == 2 * n // 4 + 2 * n // 4 + 16 * n // 4 + bucket + 2 * n  # + the gathered layer (all of n here)
    fp32 = plan.model_state_bytes(n, plan.Layout(nodes=1, gpus_per_node=4, zero=0, precision="fp32"), 10)
    assert fp32["weights"] + fp32["gradients"] + fp32["optimizer"] == 16 * n
    off = plan.model_state_bytes(n, plan.Layout(nodes=1, gpus_per_node=4, zero=3, offload=True), 10)
    # Host: fp32 master + Adam m, v, the fp32 gradient partition, the bf16 parameter partition.
    assert off["optimizer"] == 0 and off["host"] == 12 * n // 4 + 4 * n // 4 + 2 * n // 4


PRESETS = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_planned(preset):
    cfg = build_config(preset)
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.tokenizer_vocab_size
    p = cfg.parallel
    lay = plan.Layout(nodes=1, gpus_per_node=8, tensor=p.tensor, pipeline=p.pipeline, zero=1,
                      micro_batch=cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size,
                      precision=cfg.train.precision)
    r = report(cfg, lay, plan.ASSUMED_MFU, 989.0)
    assert r["peak_bytes"] > 0 and r["step_s"] > 0 and r["params_total"] > 0


def run_tool(*args: str):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                               "PATH": "/usr/bin:/bin"})


def test_plan_cli_search_and_bad_input():
    out = run_tool("tools/plan.py", "1b", "--nodes", "4", "--gpu", "h200", "--search")
    assert out.returncode == 0, out.stderr
    assert "FITS" in out.stdout and "layouts that fit" in out.stdout
    bad = run_tool("tools/plan.py", "1b", "--tensor", "3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: layout: 8 devices are not a multiple of TP x PP = 3")
    worse = run_tool("tools/plan.py", "nope")
    assert worse.returncode == 2 and worse.stderr.startswith("error: unknown preset")


def slurm_layout() -> dict:
    """nodes, tasks per node, CONFIG and DS_CONFIG as slurm/pretrain_1b.sh is written."""
    text = (REPO / "slurm" / "pretrain_1b.sh").read_text()
    return {"nodes": int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1)),
            "per_node": int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1)),
            "config": re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text).group(1),
            "ds": re.search(r"DS_CONFIG=\$\{DS_CONFIG:-(\S+)\}", text).group(1)}


def test_dry_run_of_the_1b_job_as_slurm_submits_it():
    s = slurm_layout()
    out = run_tool("train.py", "--config", s["config"], "--deepspeed", s["ds"], "--dry-run",
                   "--world-size", str(s["nodes"] * s["per_node"]))
    assert out.returncode == 0, out.stderr
    assert "TP2 PP1 DP16, ZeRO-1" in out.stdout and "dry run: OK" in out.stdout
    assert re.search(r"stage 0: layers 0..27, [\d,]+ parameters per rank", out.stdout)
    assert "=> FITS" in out.stdout


def test_dry_run_rejects_bad_input_with_one_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    for args, fragment in [(["--deepspeed", str(bad), "--world-size", "32"], "DeepSpeed rejects"),
                           (["--world-size", "30"], "not a multiple"), (["--world-size", "x"], "positive integer"),
                           (["--world-size", "32", "--data.train_data", str(tmp_path / "none")], "")]:
        out = run_tool("train.py", "--config", "1b", "--dry-run", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0]
