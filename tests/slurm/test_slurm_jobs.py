"""slurm/pretrain_1b.sh under a real Slurm (the `slurm_cluster` fixture), with the CPU override.

The same script as on a GPU cluster, no edited copy: `sbatch --nodes 1 --ntasks 4 --gpus-per-node 0
--export=ALL,CONFIG=tiny,OVERRIDES=... slurm/pretrain_1b.sh` runs a TP2 x DP2 job on the 2-core VM.

* a job runs to completion and writes metrics.jsonl and a checkpoint (also the reference below);
* preemption: a running job gets `scancel --signal=USR1`; every rank saves at the next step
  boundary, rank 0 requeues the job, the job comes back (we skip Slurm's ~2-minute requeue delay
  with `scontrol update StartTime=now`), resumes from `latest` and finishes. Every step is logged
  exactly once across the two runs, and the final losses equal the uninterrupted job's exactly
  (fp32, same data order, DeepSpeed restores model, optimizer and schedule exactly).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, base_env

STEPS = 40
OVERRIDES = ("--parallel.tensor 2 --model.num_layers 2 --model.hidden_size 64 --model.num_heads 4 "
             "--model.seq_length 32 --data.corpus_max_bytes 300000 --data.tokenizer_vocab_size 512 "
             f"--train.max_steps {STEPS} --train.global_batch_size 8 --train.micro_batch_size 2 "
             "--train.warmup_steps 5 --logging.log_interval 1 --train.eval_interval 0 --train.eval_iters 1 "
             "--logging.wandb off --logging.figures false")
JOB_TIMEOUT = 420


def job_env(data_cache: Path, run_root: Path) -> dict:
    from torch.utils.cpp_extension import get_default_build_root

    env = base_env(data_cache)  # XDG_CACHE_HOME: the job reads the session's small corpus cache
    env.update(RUN_ROOT=str(run_root), TORCH_EXTENSIONS_DIR=get_default_build_root())
    return env


def submit(cluster, name: str, workdir: Path, env: dict) -> int:
    return cluster.sbatch("--job-name", name, "--nodes", "1", "--ntasks", "4", "--gpus-per-node", "0",
                          f"--export=ALL,CONFIG=tiny,OVERRIDES={OVERRIDES}", str(REPO / "slurm" / "pretrain_1b.sh"),
                          env=env, cwd=str(workdir))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in records(run_dir) if r["kind"] == "train"}


def job_output(workdir: Path, name: str, job_id: int) -> str:
    path = workdir / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


# One Slurm cluster per session: keep these tests on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group(name="slurm")

@pytest.fixture(scope="module")
def reference_job(slurm_cluster, data_cache, tmp_path_factory):
    """The uninterrupted job: sbatch slurm/pretrain_1b.sh with the tiny/CPU override, to completion."""
    workdir = tmp_path_factory.mktemp("slurm-ref")
    env = job_env(data_cache, workdir / "runs")
    started = time.monotonic()
    job_id = submit(slurm_cluster, "ref", workdir, env)
    info = slurm_cluster.wait(job_id, JOB_TIMEOUT)
    wall = time.monotonic() - started
    output = job_output(workdir, "ref", job_id)
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{output[-6000:]}"
    print(f"reference Slurm job {job_id}: {wall:.1f}s from sbatch to COMPLETED")
    return {"id": job_id, "run_dir": workdir / "runs" / f"ref-{job_id}", "output": output, "wall_s": wall}


def test_pretrain_1b_script_runs_a_tp2_dp2_cpu_job(reference_job):
    run_dir, output = reference_job["run_dir"], reference_job["output"]
    assert "world 4 = TP2 x PP1 x DP2" in output, output[-4000:]
    assert "device cpu" in output and "restart 0" in output
    assert "default data: building" not in output  # the job read the session's cache (XDG_CACHE_HOME)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert any(r["kind"] == "final" for r in records(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert (run_dir / "launches.log").read_text().count("restart 0") == 1


def test_preempted_job_saves_requeues_resumes_and_matches(slurm_cluster, data_cache, reference_job, tmp_path):
    env = job_env(data_cache, tmp_path / "runs")
    job_id = submit(slurm_cluster, "pre", tmp_path, env)
    run_dir = tmp_path / "runs" / f"pre-{job_id}"

    # Let it train a few steps, then deliver what Slurm sends before a time limit.
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(train_losses(run_dir)) < 3:
        assert time.monotonic() < deadline, job_output(tmp_path, "pre", job_id)[-4000:]
        assert slurm_cluster.job(job_id).get("JobState") in ("PENDING", "RUNNING"), \
            job_output(tmp_path, "pre", job_id)[-4000:]
        time.sleep(0.2)
    signalled_at = max(train_losses(run_dir))
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))

    # Rank 0 requeues it after the checkpoint; Slurm holds a requeued job ~2 minutes (BeginTime).
    while True:
        info = slurm_cluster.job(job_id)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            break
        assert info.get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), \
            f"{info}\n{job_output(tmp_path, 'pre', job_id)[-4000:]}"
        assert time.monotonic() < deadline, f"not requeued: {info}\n{job_output(tmp_path, 'pre', job_id)[-4000:]}"
        time.sleep(0.5)
    # Slurm would hold the requeued job ~2 minutes; we start it now, but only once the node has torn
    # down the first run (srun waits up to 7 s for its step), or the relaunch can fail on a busy node.
    idle_deadline = time.monotonic() + 90
    while slurm_cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle" and time.monotonic() < idle_deadline:
        time.sleep(0.5)
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    info = slurm_cluster.wait(job_id, JOB_TIMEOUT)
    output = job_output(tmp_path, "pre", job_id)
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{output[-6000:]}"

    stops = [r for r in records(run_dir) if r["kind"] == "stop"]
    assert len(stops) == 1, output[-4000:]
    stop = stops[0]
    assert stop["reason"] == "signal SIGUSR1" and stop["requeue"] is True
    assert signalled_at <= stop["step"] < STEPS
    assert stop["checkpoint"].endswith(f"step_{stop['step']:07d}")
    assert "requeued Slurm job" in output and "restart 1" in output
    tag = f"step_{stop['step']:07d}"
    assert f"resumed from {run_dir / 'checkpoints' / tag}" in output

    # Every step exactly once across the two runs: none lost, none repeated.
    steps = [r["step"] for r in records(run_dir) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), steps
    mine, reference = train_losses(run_dir), train_losses(reference_job["run_dir"])
    assert mine == reference, {s: (mine[s], reference[s]) for s in mine if mine[s] != reference[s]}
    final = [r for r in records(run_dir) if r["kind"] == "final"][0]
    final_ref = [r for r in records(reference_job["run_dir"]) if r["kind"] == "final"][0]
    assert final["val_loss"] == final_ref["val_loss"]
    print(f"preempted job {job_id}: stopped after step {stop['step']} (signal seen at >= {signalled_at}), "
          f"resumed at {stop['step'] + 1}, final loss {mine[STEPS]!r} == reference {reference[STEPS]!r}")
