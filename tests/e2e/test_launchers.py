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

# The last test compares the launchers' runs, so they must share one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("launchers")

BIN = Path(sys.executable).parent
TINY = ["--model.num_layers", "4", "--model.hidden_size", "64", "--model.num_heads", "4", "--model.seq_length", "32",
        "--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512",
        "--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.max_steps", "2",
        "--logging.log_interval", "1", "--train.save_dir", "''", "--train.eval_iters", "1"]

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
_losses: dict[str, list[float]] = {}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_process_job_under_launcher(run_train, launcher):
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
    _losses[launcher] = [r["lm_loss"] for r in train]


def test_every_launcher_trained_the_same_model():
    if len(_losses) < 2:
        pytest.skip("needs at least two launcher runs from this session")
    first = next(iter(_losses.values()))
    for name, losses in _losses.items():
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, first)), (name, _losses)
