"""benchmarks/gpu_check.py: its whole control flow on tiny CPU shapes (the Triton kernels under the
interpreter), and its answer on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="triton not installed")
def test_cpu_dry_run_prints_one_json_object_with_every_part(tmp_path):
    proc = run("--cpu-dry-run", "--json-out", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "out.json").read_text())
    for part in ("accuracy", "speed", "1b_width"):
        assert "error" not in report[part] and "skipped" not in report[part], (part, report[part])
    accuracy = report["accuracy"]
    assert accuracy["ok"], accuracy["failures"]
    assert accuracy["cases"] > 0 and set(accuracy["self_check"]) == {"fp32", "fp16"}
    for T in ("T=64", "T=128"):
        row = report["speed"][T]
        assert row["sdpa_noreg"]["median_ms"] > 0 and row["fused_reg"]["median_ms"] > 0
        assert row["fused_over_sdpa"] > 0
    assert report["1b_width"]["tokens_per_s"] > 0 and report["1b_width"]["steps"] == 3


def test_without_a_gpu_it_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run()
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
