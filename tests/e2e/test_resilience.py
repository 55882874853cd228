"""Resilience (megatron_entropy/training/resilience.py): non-finite steps, stop signals, time budget.

The multi-rank runs start 4 train.py processes ourselves (TP2 x DP2, RANK/WORLD_SIZE set per process,
no launcher that kills the others when one exits), so every rank's own exit code and output can be
checked: a decision must be the same on every rank.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_entropy.config import ConfigError, build_config
from megatron_entropy.training.resilience import SpikeDetector, StopFlag, parse_inject
from tests.conftest import REPO, SMALL_DATA, base_env, free_port

TINY = SMALL_DATA + ["--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_heads", "4",
                     "--model.seq_length", "32", "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
                     "--train.warmup_steps", "2", "--logging.log_interval", "1", "--train.eval_interval", "0",
                     "--train.eval_iters", "1", "--logging.wandb", "off", "--logging.progress_bar", "false",
                     "--logging.figures", "false"]


# ----------------------------------------------------------------------------- units

def test_parse_inject_reads_step_and_rank():
    assert parse_inject("") is None
    assert parse_inject("5:1") == (5, 1)
    assert parse_inject("12:75") == (12, 75)
    cfg = build_config("tiny", ["--train.inject_nan_at", "5:1"]).validate()  # string keys stay verbatim
    assert parse_inject(cfg.train.inject_nan_at) == (5, 1)
    for bad in ("five:one", "301"):
        with pytest.raises(ValueError):
            parse_inject(bad)


@pytest.mark.parametrize("override", [["--train.nonfinite", "ignore"], ["--train.exit_duration_minutes", "-1"],
                                      ["--train.inject_nan_at", "x:1"], ["--logging.spike_factor", "0.5"],
                                      ["--data.train_weights", "[0.5]"]])
def test_bad_resilience_settings_are_one_line_errors(override):
    with pytest.raises(ConfigError) as err:
        build_config("tiny", override).validate()
    assert "\n" not in str(err.value) and override[0][2:] in str(err.value)


def test_spike_detector_warns_only_on_a_jump_over_the_recent_median():
    spikes = SpikeDetector(1.5)
    assert all(spikes.check(step, loss) is None for step, loss in enumerate([6.0, 5.0, 4.0, 3.5, 3.2, 3.1, 3.0]))
    assert spikes.check(8, float("nan")) is None  # non-finite losses are the non-finite guard's business
    record = spikes.check(9, 6.5)
    assert record["kind"] == "spike" and record["step"] == 9 and record["reference"] == 3.5
    assert SpikeDetector(0).check(1, 1e9) is None


def test_stop_flag_only_records_the_signal():
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.received == signal.SIGUSR1
    finally:
        flag.restore()


def _phases_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megatron_entropy.data import DataError
    from megatron_entropy.training.resilience import first_rank_per_node_first

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    outcome = {}
    for case in ("ok", "fail"):
        calls = []

        def build(first_on_node):
            calls.append([time.time(), first_on_node])
            if case == "fail" and rank == 0:
                raise DataError("token shard x.bin is truncated; re-run tools/preprocess_data.py")
            time.sleep(0.3 if first_on_node else 0.0)  # "building"
            calls[-1].append(time.time())
            return rank

        try:  # two "nodes": ranks 0 | 1, 2 (local ranks 0 | 0, 1)
            outcome[case] = {"result": first_rank_per_node_first(build, rank, [0, 0, 1][rank], world)}
        except Exception as e:  # noqa: BLE001
            outcome[case] = {"error": type(e).__name__, "message": str(e)}
        outcome[case]["calls"] = calls
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(outcome))
    from megatron_entropy.training.distributed import exit_process

    exit_process(0)  # destroys the group; avoids Gloo's finalization race (see its docstring)


def test_data_is_built_by_one_rank_per_node_first_and_failures_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_phases_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    out = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    ok = [o["ok"] for o in out]
    assert [o["result"] for o in ok] == [0, 1, 2]
    assert [o["calls"][0][1] for o in ok] == [True, True, False]  # first on its node: ranks 0 and 1
    # global rank 0 finished before node 1's first rank began, which finished before the rest began
    assert ok[0]["calls"][0][2] <= ok[1]["calls"][0][0] and ok[1]["calls"][0][2] <= ok[2]["calls"][0][0]
    fail = [o["fail"] for o in out]
    assert {o["error"] for o in fail} == {"DataError"}
    assert len({o["message"] for o in fail}) == 1 and "truncated" in fail[0]["message"]
    assert [len(o["calls"]) for o in fail] == [1, 0, 0]  # nobody else touched the data


# ----------------------------------------------------------------------------- multi-rank runs

def spawn(args: list[str], nproc: int, workdir: Path, env: dict) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        out = open(workdir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=rank_env, cwd=workdir,
                                      stdout=out, stderr=subprocess.STDOUT, text=True))
        out.close()
    return procs


def wait_all(procs, workdir: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout}s:\n{logs(workdir)}")
    return codes


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(workdir.glob("rank*.log")))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def rank_env(data_cache):
    from torch.utils.cpp_extension import get_default_build_root

    env = base_env(data_cache)
    env["TORCH_EXTENSIONS_DIR"] = get_default_build_root()
    for key in [k for k in env if k.startswith(("SLURM_", "OMPI_", "PMI"))]:
        env.pop(key)  # not under Slurm: a stop must not try to requeue anything
    return env


def test_nan_on_one_rank_is_skipped_by_all_and_a_signal_to_one_rank_stops_all(rank_env, tmp_path):
    """Rank 3's loss is NaN at step 2: every rank skips that update and training goes on. Later only
    rank 1 gets SIGTERM: at the next step boundary every rank agrees, saves the same step, exits 0."""
    run_dir = tmp_path / "run"
    procs = spawn(TINY + ["--parallel.tensor", "2", "--train.max_steps", "500", "--train.inject_nan_at", "2:3",
                          "--logging.run_dir", str(run_dir)], 4, tmp_path, rank_env)
    deadline = time.monotonic() + 300
    while len([r for r in records(run_dir) if r["kind"] == "train"]) < 4:
        assert all(p.poll() is None for p in procs), logs(tmp_path)
        assert time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs, tmp_path)
    assert codes == [0, 0, 0, 0], logs(tmp_path)

    recs = records(run_dir)
    skips = [r for r in recs if r["kind"] == "nonfinite"]
    assert len(skips) == 1, recs
    skip = skips[0]
    assert skip["step"] == 2 and skip["action"] == "skip"
    assert skip["problems"]["3"].startswith("loss")  # the rank it came from, named
    assert len(skip["samples"]["3"]) == 2  # its micro-batches' sample indices (2 x 2 samples)
    assert "non-finite values at step 2" in (tmp_path / "rank0.log").read_text()

    train = {r["step"]: r["lm_loss"] for r in recs if r["kind"] == "train"}
    # Had any rank applied the NaN update, its weights (and from then on the DP-mean loss) would be NaN.
    assert all(loss is not None and math.isfinite(loss) for step, loss in train.items() if step > 2), train

    stop = [r for r in recs if r["kind"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == "signal SIGTERM" and stop[0]["requeue"] is False
    last = max(train)
    assert stop[0]["step"] == last < 500 and stop[0]["skipped_steps"] == 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    assert not [r for r in recs if r["kind"] == "final"]


def test_nan_with_policy_stop_exits_every_rank_nonzero_with_the_diagnostic(rank_env, tmp_path):
    run_dir = tmp_path / "run"
    procs = spawn(TINY + ["--parallel.tensor", "2", "--train.max_steps", "6", "--train.inject_nan_at", "3:2",
                          "--train.nonfinite", "stop", "--logging.run_dir", str(run_dir)], 4, tmp_path, rank_env)
    codes = wait_all(procs, tmp_path)
    assert codes == [3, 3, 3, 3], logs(tmp_path)
    messages = set()
    for rank in range(4):
        lines = [ln for ln in (tmp_path / f"rank{rank}.log").read_text().splitlines()
                 if ln.startswith(f"[rank {rank}] error: non-finite values at step 3")]
        assert len(lines) == 1, logs(tmp_path)
        messages.add(lines[0].split("] ", 1)[1])
    assert len(messages) == 1  # the same diagnostic on every rank
    message = messages.pop()
    assert "rank 2: loss (micro-batch 0)" in message and "sample indices of rank(s) 2" in message
    assert message.endswith("stopping (train.nonfinite=stop)")
    recs = records(run_dir)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2]
    assert [(r["step"], r["action"]) for r in recs if r["kind"] == "nonfinite"] == [(3, "stop")]
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_exit_duration_saves_and_exits_zero_on_a_blended_dataset(run_train, data_cache):
    """train.exit_duration_minutes counts from the process start: a tiny budget stops after step 1.
    The data is a 0.7/0.3 blend of the small corpus' train and valid shards (data.train_weights)."""
    entry = next((data_cache / "megatron_entropy").glob("stdlib-v512-b300000-*"))
    run = run_train(["--data.train_data", f"[{entry / 'train'}, {entry / 'valid'}]", "--data.train_weights",
                     "[0.7, 0.3]", "--data.valid_data", str(entry / "valid"), "--data.tokenizer",
                     str(entry / "tokenizer.model"), "--train.exit_duration_minutes", "0.001",
                     "--train.max_steps", "50", "--logging.log_interval", "1", "--train.global_batch_size", "8",
                     "--train.micro_batch_size", "8", "--model.seq_length", "32"],
                    env_extra={"SLURM_JOB_ID": ""})
    assert "blend of 2 sources" in run.proc.stdout
    stop = run.kind("stop")
    assert len(stop) == 1 and stop[0]["reason"].startswith("train.exit_duration_minutes=0.001")
    assert stop[0]["step"] == 1 and stop[0]["requeue"] is False and not run.kind("final")
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
