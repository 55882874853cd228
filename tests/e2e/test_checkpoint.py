"""Checkpoints end to end (real train.py processes): exact resume, SIGKILL during a save, resharding
across TP/PP layouts, bad input, and refusing to unpickle anything but tensors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL_DATA, SMALL_MODEL, base_env, free_port

STEPS = ["--logging.log_interval", "1", "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
         "--train.eval_iters", "1", "--train.eval_interval", "2", "--train.save_interval", "2"]
PAUSE_ENV = "MEGATRON_ENTROPY_TEST_PAUSE_BEFORE_LATEST"


def command(args: list[str], run_dir: Path, nproc: int = 1) -> list[str]:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return cmd + [str(REPO / "train.py"), *SMALL_DATA, *SMALL_MODEL, "--logging.run_dir", str(run_dir),
                  "--logging.wandb", "off", "--logging.progress_bar", "false", "--logging.figures", "false", *args]


def train(cache: Path, run_dir: Path, args: list[str], nproc: int = 1, check: bool = True, env: dict | None = None):
    proc = subprocess.run(command(args, run_dir, nproc), env={**base_env(cache), **(env or {})}, cwd=run_dir.parent,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["lm_loss"], r["loss"]) for r in records(run_dir, "train")}


def val_loss(run_dir: Path, step: int, resume_check: bool = False) -> float:
    found = [r["val_loss"] for r in records(run_dir, "eval")
             if r["step"] == step and bool(r.get("resume_check")) == resume_check]
    assert found, records(run_dir, "eval")
    return found[-1]


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), proc.stderr[-3000:]
    return lines[-1] if lines else ""


def run_tool(name: str, args: list[str]) -> tuple[int, str, str]:
    """Run tools/<name>'s main(args) in this process: (exit code, stdout, stderr). Cheaper than a new
    interpreter; the tools' exit paths are the same (fail() raises SystemExit(2))."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"_tool_{name[:-3]}", REPO / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(args) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a run killed mid-save

@pytest.fixture(scope="module")
def killed_run(data_cache, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4; SIGKILL while the step-4 save waits before moving `latest`."""
    root = tmp_path_factory.mktemp("killed")
    run_dir, save_dir, marker = root / "run", root / "ckpt", root / "paused"
    env = {**base_env(data_cache), PAUSE_ENV: f"4:{marker}"}
    proc = subprocess.Popen(command(STEPS + ["--train.max_steps", "4", "--train.save_dir", str(save_dir)], run_dir),
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    assert alive and marker.exists(), output[-4000:]
    return {"root": root, "run_dir": run_dir, "save_dir": save_dir}


def test_sigkill_during_save_keeps_latest_and_auto_resume_is_exact(killed_run, data_cache):
    save_dir = killed_run["save_dir"]
    # The step-4 files and metadata were written, but `latest` never moved to them.
    assert (save_dir / "latest").read_text().strip() == "step_0000002"
    assert (save_dir / "step_0000004" / "mp_rank_00_model_states.pt").exists()
    before = losses(killed_run["run_dir"])
    assert sorted(before) == [1, 2, 3, 4]

    resumed = killed_run["root"] / "resumed"
    proc = train(data_cache, resumed, STEPS + ["--train.max_steps", "4", "--train.save_dir", str(save_dir),
                                               "--train.resume", "auto"])
    assert "resumed from" in proc.stdout and "step_0000002" in proc.stdout
    after = losses(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):  # fp32 on CPU: bit-identical
        assert after[step] == before[step], (step, after[step], before[step])
    assert (save_dir / "latest").read_text().strip() == "step_0000004"
    meta = json.loads((save_dir / "step_0000004" / "megatron_entropy.json").read_text())
    assert meta["consumed_samples"] == 32 and meta["layout"]["tensor"] == 1
    assert (save_dir / "step_0000004" / "rng_state_rank00000.json").is_file()
    assert (save_dir / "step_0000004" / "tokenizer.model").is_file()


# ----------------------------------------------------------------------------- exact resume per layout

LAYOUTS = {
    "tp2": (2, ["--parallel.tensor", "2"]),
    "pp2": (2, ["--parallel.pipeline", "2"]),
    "dp2_zero2": (2, ["--deepspeed", str(REPO / "ds_configs/zero2.json")]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bit_identical(layout, data_cache, tmp_path):
    if layout == "pp2" and not (REPO / "megatron_entropy/training/pipeline.py").exists():
        pytest.skip("pipeline parallelism (training/pipeline.py) is not available")
    nproc, extra = LAYOUTS[layout]
    full = tmp_path / "full"
    train(data_cache, full, STEPS + extra + ["--train.max_steps", "4"], nproc=nproc)
    resumed = tmp_path / "resumed"
    ckpt = full / "checkpoints" / "step_0000002"
    proc = train(data_cache, resumed, STEPS + extra + ["--train.max_steps", "4", "--train.resume", str(ckpt)],
                 nproc=nproc)
    assert "resuming weights only" not in proc.stdout  # DeepSpeed loaded everything, optimizer included
    before, after = losses(full), losses(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step] == before[step], (layout, step, after[step], before[step])


# ----------------------------------------------------------------------------- resharding

def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_reshard_tp2pp2_to_tp1_and_tp1_to_tp2pp2(killed_run, data_cache, tmp_path):
    if not (REPO / "megatron_entropy/training/pipeline.py").exists():
        pytest.skip("pipeline parallelism (training/pipeline.py) is not available")
    # TP2 x PP2 -> TP1 through the tool (fp32 ZeRO-0 moments go into its side file); train.py continues
    # from it under ZeRO-1, placing the moments into DeepSpeed's fp32 partitions.
    source = tmp_path / "tp2pp2"
    train(data_cache, source, STEPS + ["--train.max_steps", "4", "--parallel.tensor", "2", "--parallel.pipeline", "2"],
          nproc=4)
    converted = tmp_path / "tp1_ckpt"
    tool = subprocess.run([sys.executable, str(REPO / "tools/reshard_checkpoint.py"),
                           str(source / "checkpoints" / "step_0000002"), str(converted), "--tensor", "1",
                           "--pipeline", "1"], env=base_env(data_cache), capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert "weights and Adam moments" in tool.stdout
    meta = json.loads((converted / "step_0000002" / "megatron_entropy.json").read_text())
    assert meta["layout"]["tensor"] == 1 and meta["optimizer_state"] == "moments"
    assert (converted / "step_0000002" / "optimizer_moments.safetensors").is_file()
    resumed = tmp_path / "tp1"
    proc = train(data_cache, resumed, STEPS + ["--train.max_steps", "4", "--train.resume", str(converted),
                                               "--deepspeed", str(REPO / "ds_configs/zero1.json")])
    assert "Adam moments (" in proc.stdout, proc.stdout[-2000:]
    before, after = val_loss(source, 2), val_loss(resumed, 2, resume_check=True)
    assert abs(after - before) <= 1e-6 * abs(before), (before, after)
    print(f"TP2xPP2 -> TP1 resume check: relative validation-loss difference {abs(after - before) / before:.1e}")
    assert sorted(losses(resumed)) == [3, 4]

    # TP1 -> TP2 x PP2 directly: train.py detects the layout from the metadata and converts, carrying the
    # fp32 ZeRO-0 Adam moments, so the run continues as the uninterrupted TP1 run did (up to rounding).
    tp1_ckpt = killed_run["save_dir"] / "step_0000002"
    target = tmp_path / "tp2pp2_resumed"
    proc = train(data_cache, target, STEPS + ["--train.max_steps", "4", "--parallel.tensor", "2",
                                              "--parallel.pipeline", "2", "--train.resume", str(tp1_ckpt)], nproc=4)
    assert "saved under TP1 x PP1" in proc.stdout and "Adam moments (" in proc.stdout
    before, after = val_loss(killed_run["run_dir"], 2), val_loss(target, 2, resume_check=True)
    assert abs(after - before) <= 1e-6 * abs(before), (before, after)
    print(f"TP1 -> TP2xPP2 resume check: relative validation-loss difference {abs(after - before) / before:.1e}")
    uninterrupted, continued = losses(killed_run["run_dir"]), losses(target)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert close(continued[step][0], uninterrupted[step][0]), (step, continued[step], uninterrupted[step])
    print("TP1 -> TP2xPP2 with moments: relative loss differences at steps 3, 4:",
          [f"{abs(continued[k][0] - uninterrupted[k][0]) / abs(uninterrupted[k][0]):.1e}" for k in (3, 4)])

    # The moments two steps after each conversion are the uninterrupted runs' (re-initialised ones would
    # lack 0.9^2 of steps 1-2's history): TP2 x PP2 ZeRO-0 partitions -> side file -> TP1 ZeRO-1, and
    # TP1 ZeRO-0 -> TP2 x PP2 ZeRO-0, compared with the TP2 x PP2 source (all runs see the same data).
    reference = _full_moments(source / "checkpoints" / "step_0000004")
    for run in (resumed, target):
        differences = _moment_differences(reference, _full_moments(run / "checkpoints" / "step_0000004"))
        assert all(d <= 1e-5 for d in differences.values()), (run.name, differences)
        print(f"step-4 moments of {run.name} vs the TP2xPP2 source: {differences}")


def _full_moments(tag_dir: Path) -> dict:
    from megatron_entropy.training import checkpoint as ckpt
    from megatron_entropy.training.reshard import CheckpointReader

    path, meta = ckpt.open_checkpoint(tag_dir)
    found = CheckpointReader(path, meta).full_moments()
    assert found is not None, f"{tag_dir} holds no readable Adam moments"
    return found[1]


def _moment_differences(a, b) -> dict[str, float]:
    """Largest |a - b| over all tensors, per moment kind, relative to that kind's largest |a|. (A
    per-tensor ratio would be dominated by the key biases: their gradient is zero in exact arithmetic,
    so their moments are rounding noise of order 1e-11.)"""
    out = {}
    for kind in ("exp_avg", "exp_avg_sq"):
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
        scale = max(float(a[n][kind].abs().max()) for n in a)
        out[kind] = max(float((a[n][kind] - b[n][kind]).abs().max()) for n in a) / scale
    return out


def test_zero2_adam_moments_move_to_another_layout(data_cache, tmp_path):
    """TP2 x DP2 ZeRO-2 -> one process ZeRO-2: the moments come out of DeepSpeed's flat partitions and go
    into the new run's, so it trains on exactly as the uninterrupted run did. lr 1e-2 without warm-up
    makes the optimizer state matter: re-initialised moments (the ZeRO-3 run) change the step-4 loss."""
    from megatron_entropy.training import checkpoint as ckpt
    from megatron_entropy.training.reshard import CheckpointReader

    def moments_of(path: Path):
        path, meta = ckpt.open_checkpoint(path)
        return CheckpointReader(path, meta).full_moments()

    fast = STEPS + ["--train.max_steps", "4", "--train.warmup_steps", "0", "--train.lr", "1e-2"]
    source = tmp_path / "tp2dp2"
    train(data_cache, source, fast + ["--parallel.tensor", "2", "--deepspeed", str(REPO / "ds_configs/zero2.json")],
          nproc=4)
    saved = source / "checkpoints" / "step_0000002"
    runs = {}
    for zero in ("zero2", "zero3"):
        runs[zero] = tmp_path / f"tp1_{zero}"
        proc = train(data_cache, runs[zero], fast + ["--train.resume", str(saved),
                                                      "--deepspeed", str(REPO / f"ds_configs/{zero}.json")])
        carried = "Adam moments (" in proc.stdout
        assert carried == (zero == "zero2"), proc.stdout[-2000:]
    uninterrupted, continued, fresh = losses(source), losses(runs["zero2"]), losses(runs["zero3"])
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert close(continued[step][0], uninterrupted[step][0]), (step, continued[step], uninterrupted[step])
    assert not close(fresh[4][0], uninterrupted[4][0], rel=1e-4), "the optimizer state does not matter here"

    step, source_moments = moments_of(source / "checkpoints" / "step_0000004")
    resumed_step, resumed_moments = moments_of(runs["zero2"] / "checkpoints" / "step_0000004")
    assert int(step) == int(resumed_step) == 4 and sorted(source_moments) == sorted(resumed_moments)
    differences = _moment_differences(source_moments, resumed_moments)
    assert all(d <= 1e-5 for d in differences.values()), differences
    print(f"ZeRO-2 TP2xDP2 -> TP1: step-4 moments differ by {differences}; loss at step 4 "
          f"{continued[4][0]:.7f} vs uninterrupted {uninterrupted[4][0]:.7f} (re-initialised: {fresh[4][0]:.7f})")

    # The tool carries them too: its side file holds exactly what the partitions hold.
    converted = tmp_path / "converted"
    code, out, err = run_tool("reshard_checkpoint.py", [str(saved), str(converted), "--tensor", "1"])
    assert code == 0 and "weights and Adam moments" in out, err
    _, from_partitions = moments_of(saved)
    _, from_side_file = moments_of(converted / "step_0000002")
    assert _moment_differences(from_partitions, from_side_file) == {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def test_bf16_zero2_checkpoint_reshards_with_its_moments(data_cache, tmp_path):
    """bf16 runs name their partitions bf16_zero_pp_rank_*: the fp32 moments are read from them too,
    and a ZeRO-2 run resumed from the resharded copy takes them, and the fp32 master weights."""
    import torch

    from megatron_entropy.training import checkpoint as ckpt
    from megatron_entropy.training.reshard import CheckpointReader

    bf16 = STEPS + ["--train.max_steps", "2", "--train.precision", "bf16",
                    "--deepspeed", str(REPO / "ds_configs/zero2.json")]
    source = tmp_path / "bf16"
    train(data_cache, source, bf16)
    saved = source / "checkpoints" / "step_0000002"
    assert any(p.name.startswith("bf16_zero_pp_rank_") for p in saved.iterdir())
    converted = tmp_path / "converted"
    code, out, err = run_tool("reshard_checkpoint.py", [str(saved), str(converted), "--tensor", "2"])
    assert code == 0 and "weights and Adam moments" in out, err
    path, meta = ckpt.open_checkpoint(saved)
    step, from_partitions = CheckpointReader(path, meta).full_moments()
    path, meta = ckpt.open_checkpoint(converted / "step_0000002")
    _, from_side_file = CheckpointReader(path, meta).full_moments()
    assert int(step) == 2 and len(from_partitions) > 10
    assert _moment_differences(from_partitions, from_side_file) == {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    # Resumed in another layout (TP2 -> TP1) for zero further steps, its final checkpoint's fp32 master
    # weights are the source's exactly, not the source's rounded to bf16 and widened again.
    resumed = tmp_path / "resumed"
    proc = train(data_cache, resumed, bf16 + ["--train.resume", str(converted)])
    assert "Adam moments (" in proc.stdout and "fp32 master weights" in proc.stdout, proc.stdout[-2000:]
    path, meta = ckpt.open_checkpoint(saved)
    before = CheckpointReader(path, meta).full_state_dict()
    path, meta = ckpt.open_checkpoint(resumed / "checkpoints" / "step_0000002")
    after = CheckpointReader(path, meta).full_state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before), \
        max(float((before[n] - after[n]).abs().max()) for n in before)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in before.values())  # masters are not bf16 values


# ----------------------------------------------------------------------------- bad input

def _bad_checkpoints(good: Path, root: Path) -> dict[str, Path]:
    """Broken variants of a good checkpoint directory."""
    cases = {"missing": root / "does_not_exist"}
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"not ours")
    cases["foreign"] = foreign
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated"] = truncated
    future = root / "future"
    shutil.copytree(good, future)
    meta = json.loads((future / "megatron_entropy.json").read_text())
    meta["format_version"] = 99
    (future / "megatron_entropy.json").write_text(json.dumps(meta))
    cases["future"] = future
    return cases


EXPECTED = {"missing": "does not exist", "foreign": "not a complete megatron_entropy checkpoint",
            "truncated": "truncated", "future": "metadata version 99"}


def test_bad_checkpoints_give_one_line_exit_2_and_write_nothing(killed_run, data_cache, tmp_path):
    good = killed_run["save_dir"] / "step_0000002"
    cases = _bad_checkpoints(good, tmp_path)
    before = {name: snapshot(path) for name, path in cases.items() if path.exists()}
    for name in ("truncated", "future"):  # through train.py (rank 0 stops before building anything)
        run_dir = tmp_path / f"run_{name}"
        proc = train(data_cache, run_dir, STEPS + ["--train.max_steps", "3", "--train.resume", str(cases[name]),
                                                   "--train.save_dir", str(cases[name].parent / f"save_{name}")],
                     check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        assert line.startswith("error: ") and EXPECTED[name] in line, line
        assert not run_dir.exists() and not (cases[name].parent / f"save_{name}").exists()
    for name, path in cases.items():  # through the tools (in-process: same exit path, no new interpreter)
        for tool, extra in (("reshard_checkpoint.py", [str(tmp_path / f"out_{name}"), "--tensor", "2"]),
                            ("convert_to_hf.py", [str(tmp_path / f"hf_{name}")]),
                            ("eval_ppl.py", ["--data", str(tmp_path / "nothing")])):
            code, _, err = run_tool(tool, [str(path), *extra])
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (tool, name, err)
            assert lines[0].startswith("error: ") and EXPECTED[name] in lines[0], (tool, lines)
            assert not (tmp_path / f"out_{name}").exists() and not (tmp_path / f"hf_{name}").exists()
    assert {name: snapshot(path) for name, path in cases.items() if path.exists()} == before

    # A layout that does not divide the model; an output directory that is not empty.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for extra, fragment in (([str(tmp_path / "out_tp3"), "--tensor", "3"], "does not divide the model's 4 heads"),
                            ([str(tmp_path / "out_pp9"), "--pipeline", "9"], "exceeds the model's 2 layers"),
                            ([str(taken), "--tensor", "2"], "already exists and is not empty")):
        code, _, err = run_tool("reshard_checkpoint.py", [str(good), *extra])
        assert code == 2 and fragment in err.strip().splitlines()[-1], err
    code, _, err = run_tool("convert_to_hf.py", [str(good), str(taken)])
    assert code == 2 and "already exists and is not empty" in err, err
    assert not (tmp_path / "out_tp3").exists() and (taken / "keep.txt").read_text() == "mine"
    assert len(list(taken.iterdir())) == 1
    # One real process per tool for the exit code as the shell sees it.
    proc = subprocess.run([sys.executable, str(REPO / "tools/reshard_checkpoint.py"), str(cases["future"]),
                           str(tmp_path / "out_real"), "--tensor", "2"], env=base_env(data_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and EXPECTED["future"] in error_line(proc), proc.stderr[-2000:]


class Payload:
    """Unpickling this creates a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(killed_run, data_cache, tmp_path):
    import torch

    from megatron_entropy.training.checkpoint import METADATA_NAME, CheckpointError
    from megatron_entropy.training.reshard import safe_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(killed_run["save_dir"] / "step_0000002", evil)
    weights = evil / "mp_rank_00_model_states.pt"
    state = torch.load(weights, weights_only=True)  # our own file: safe to read for the test
    state["lr_scheduler"] = {"payload": Payload(str(marker))}
    torch.save(state, weights)
    meta = json.loads((evil / METADATA_NAME).read_text())
    meta["files"]["mp_rank_00_model_states.pt"] = weights.stat().st_size  # pass the size check
    (evil / METADATA_NAME).write_text(json.dumps(meta))

    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        safe_load(weights)
    assert not marker.exists()

    run_dir = tmp_path / "run"
    proc = train(data_cache, run_dir, STEPS + ["--train.max_steps", "3", "--train.resume", str(evil)], check=False)
    assert proc.returncode == 2 and "refusing to unpickle" in error_line(proc), proc.stderr[-3000:]
    for tool, extra in (("reshard_checkpoint.py", [str(tmp_path / "out"), "--tensor", "2"]),
                        ("convert_to_hf.py", [str(tmp_path / "hf")])):
        code, _, err = run_tool(tool, [str(evil), *extra])
        assert code == 2 and "refusing to unpickle" in err, (tool, err)
    assert not marker.exists()
