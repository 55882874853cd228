"""The same train.py under every launcher on one machine (DESIGN decision 10, docs/launching.md).

Each launcher starts a 2-process job of two optimizer steps; rank 0 writes metrics.jsonl. The
layouts differ (ZeRO-2 data parallel, tensor parallel, pipeline parallel) so each launcher also
carries one kind of parallelism end to end, and since every layout trains like one process the
three runs log the same losses. Slurm's srun has its own tests (tests/slurm/).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port


BIN = Path(sys.executable).parent
TINY = ["--model.num_layers", "4", "--model.hidden_size", "64", "--model.num_heads", "4", "--model.seq_length", "32",
        "--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512",
        "--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.max_steps", "2",
        "--logging.log_interval", "1", "--train.save_dir", "", "--train.eval_iters", "1"]

LAUNCHERS = {
    "deepspeed": (lambda port: [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)],
                  ["--deepspeed", str(REPO / "ds_configs/zero2.json")], "TP1 x PP1 x DP2, ZeRO-2"),
    "torchrun": (lambda port: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)],
                 ["--parallel.tensor", "2"], "TP2 x PP1 x DP1"),
    # Open MPI: no RANK in the environment, DeepSpeed asks mpi4py; MASTER_PORT keeps jobs apart.
    "mpirun": (lambda port: ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe",
                             "-x", f"MASTER_PORT={port}", sys.executable],
               ["--parallel.pipeline", "2"], "TP1 x PP2 x DP1"),
}


@pytest.fixture(scope="module")
def single_process_losses(data_cache, tmp_path_factory):
    """The same job in one process, no launcher: every launcher and layout must reproduce it."""
    import json
    import subprocess

    from tests.conftest import base_env

    run_dir = tmp_path_factory.mktemp("single")
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--logging.run_dir", str(run_dir),
           "--logging.wandb", "off", "--logging.progress_bar", "false", "--logging.figures", "false"]
    proc = subprocess.run(cmd, env=base_env(data_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_process_job_under_launcher(run_train, single_process_losses, launcher):
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    command, args, layout = LAUNCHERS[launcher]
    run = run_train(TINY + args, launcher=command(free_port()), small=False, timeout=300)
    assert f"world 2 = {layout}" in run.proc.stdout, run.proc.stdout[-3000:]
    train = run.kind("train")
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["entropy_reg_loss"]) for r in train)
    assert len(train[-1]["entropy"]) == 4 and len(train[-1]["entropy"][0]) == 4
    assert run.kind("final"), "rank 0 did not finish the run"
    losses = [r["lm_loss"] for r in train]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, single_process_losses)), \
        (launcher, losses, single_process_losses)
