"""The spawn harness itself: results come back per rank, failures and hangs name every rank."""

from __future__ import annotations

import os
import time

import pytest

from tests.dist.harness import DistFailure, spawn

HERE = "tests/dist/test_harness.py"


def echo_env(fail_rank: int = -1, hang_rank: int = -1):
    rank = int(os.environ["RANK"])
    print(f"hello from rank {rank}", flush=True)
    if rank == fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    if rank == hang_rank:
        time.sleep(600)
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "OMP_NUM_THREADS",
                                       "DS_ACCELERATOR")}


def test_results_come_back_per_rank_through_json():
    results = spawn(f"{HERE}:echo_env", 3, timeout=60)
    assert [r.result["RANK"] for r in results] == ["0", "1", "2"]
    assert {r.result["WORLD_SIZE"] for r in results} == {"3"}
    assert len({r.result["MASTER_PORT"] for r in results}) == 1
    assert all(r.result["OMP_NUM_THREADS"] == "1" and r.result["DS_ACCELERATOR"] == "cpu" for r in results)
    assert "hello from rank 2" in results[2].stdout


def test_a_failing_rank_raises_with_every_ranks_tail():
    with pytest.raises(DistFailure) as info:
        spawn(f"{HERE}:echo_env", 2, kwargs={"fail_rank": 1, "hang_rank": 0}, timeout=60, grace=1)
    text = str(info.value)
    assert "rank(s) [0, 1] failed" in text or "rank(s) [1, 0] failed" in text
    assert "rank 1 fails on purpose" in text and "hello from rank 0" in text  # the hung rank's tail too


def test_a_hang_times_out():
    started = time.monotonic()
    with pytest.raises(DistFailure, match="timed out after 3s"):
        spawn(f"{HERE}:echo_env", 2, kwargs={"hang_rank": 1}, timeout=3)
    assert time.monotonic() - started < 30


def test_scripts_run_per_rank_and_may_write_results():
    code = "import os; from tests.dist.harness import write_result; write_result(int(os.environ['RANK']) * 10)"
    results = spawn(["-c", code], 2, timeout=60)
    assert [r.result for r in results] == [0, 10] and all(r.returncode == 0 for r in results)
