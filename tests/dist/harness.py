"""Spawn N real ranks of a Python function or script and collect what each one did.

    results = spawn("tests/dist/tp_worker.py:tp_equivalence", 2, kwargs={"tp": 2}, timeout=120)
    results[0].result      # what rank 0's function returned (through a JSON file)

    results = spawn(["train.py", "--parallel.tensor", "2"], 2)   # a script (argv), run per rank

Every rank is its own `python` process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set (a free port, found afresh on every attempt), OMP_NUM_THREADS=1 and
DS_ACCELERATOR=cpu, in its own session so the whole tree can be killed. stdout and stderr go to
files, not pipes (no pipe-buffer deadlocks, no interleaving). A function's return value is written
by its rank as JSON to `<work_dir>/rank<R>.result.json`; a script may call `write_result(obj)` to
do the same. If any rank fails, the others get `grace` seconds to finish (they are usually
blocked in a collective) before being killed; then `DistFailure` is raised with the exit code and
the stdout/stderr tails of EVERY rank. A timeout kills all ranks and raises the same way. A run
that failed only because the master port was taken meanwhile is retried once on a new port.

The module is also the per-rank entry point for functions:
    python harness.py --call FILE.py:function|package.module:function KWARGS.json RESULT.json
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT_ENV = "DIST_RESULT_FILE"
_PORT_IN_USE = ("address already in use", "EADDRINUSE", "Address in use")


class DistFailure(AssertionError):
    """A spawned job failed or timed out; the message holds every rank's exit code and tails."""


@dataclass
class RankResult:
    rank: int
    returncode: int  # negative: killed by that signal (-9: by the harness, after a timeout or another rank's failure)
    stdout: str
    stderr: str
    result: object = None  # the JSON the rank wrote, if any

    def tail(self, chars: int = 3000) -> str:
        return (f"--- rank {self.rank}: exit {self.returncode} ---\n"
                f"[stdout]\n{self.stdout[-chars:]}\n[stderr]\n{self.stderr[-chars:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "WANDB_API_KEY", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()


def _run_once(cmds: list[list[str]], envs: list[dict], work: Path, timeout: float, grace: float,
              cwd: Path) -> list[RankResult]:
    procs, files = [], []
    try:
        for rank, (cmd, env) in enumerate(zip(cmds, envs)):
            out = open(work / f"rank{rank}.stdout", "w")
            err = open(work / f"rank{rank}.stderr", "w")
            files += [out, err]
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        first_failure = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if now > deadline or (first_failure is not None and now - first_failure > grace):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill(p)
        for f in files:
            f.close()
    results = []
    for rank, p in enumerate(procs):
        result_file = work / f"rank{rank}.result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        results.append(RankResult(
            rank=rank, returncode=p.returncode,
            stdout=(work / f"rank{rank}.stdout").read_text(errors="replace"),
            stderr=(work / f"rank{rank}.stderr").read_text(errors="replace"), result=result))
    return results


def spawn(target, nprocs: int, *, kwargs: dict | None = None, timeout: float = 120.0, grace: float = 15.0,
          env: dict | None = None, work_dir: str | Path | None = None, cwd: str | Path | None = None,
          python: str = sys.executable, check: bool = True, per_rank_env=None) -> list[RankResult]:
    """Run `target` on `nprocs` ranks; return one RankResult per rank (raise DistFailure on failure).

    target: "path/to/file.py:function" or "package.module:function" (called with **kwargs, its
    JSON-serialisable return value becomes RankResult.result), or a list argv of a script (run as
    `python argv...`; it may call write_result). per_rank_env(rank) -> dict adds per-rank variables.
    """
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dist-")) if owned else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd) if cwd else REPO
    if isinstance(target, str):
        (work / "kwargs.json").write_text(json.dumps(kwargs or {}))
        argv = [str(Path(__file__).resolve()), "--call", target, str(work / "kwargs.json")]
    else:
        argv = [str(a) for a in target]
    for attempt in range(2):
        for stale in work.glob("rank*.result.json"):
            stale.unlink()
        port = free_port()
        cmds, envs = [], []
        for rank in range(nprocs):
            result_file = work / f"rank{rank}.result.json"
            extra = dict(env or {}, **{RESULT_ENV: str(result_file)})
            extra.update(per_rank_env(rank) if per_rank_env else {})
            envs.append(rank_env(rank, nprocs, port, extra))
            cmds.append([python] + argv)
        started = time.monotonic()
        results = _run_once(cmds, envs, work, timeout, grace, cwd)
        elapsed = time.monotonic() - started
        failed = [r for r in results if r.returncode != 0]
        if failed and attempt == 0 and any(m in r.stderr for r in results for m in _PORT_IN_USE):
            continue  # somebody took the port between free_port() and the rendezvous
        break
    if check and failed:
        why = (f"timed out after {timeout:.0f}s" if elapsed >= timeout else
               f"rank(s) {[r.rank for r in failed]} failed")
        raise DistFailure(f"{nprocs}-rank job {target!r} {why} (work dir {work}):\n"
                          + "\n".join(r.tail() for r in results))
    return results


def write_result(obj) -> None:
    """From inside a rank: store `obj` as this rank's JSON result (no-op outside the harness)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)


def _load(target: str):
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where) if Path(where).is_absolute() else REPO / where
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _call_main(argv: list[str]) -> int:
    target, kwargs_file = argv
    sys.path.insert(0, str(REPO))
    fn = _load(target)
    result = fn(**json.loads(Path(kwargs_file).read_text()))
    write_result(result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--call":
        code = _call_main(sys.argv[2:])
        from megatron_entropy.training.distributed import exit_process

        exit_process(code)  # a Gloo worker thread may still hold a collective at exit (see its docstring)
    print(__doc__, file=sys.stderr)
    sys.exit(2)
