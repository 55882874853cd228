"""Shared fixtures: a small cached copy of the embedded corpus and a train.py runner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Small enough to tokenise in a second or two, big enough for a few hundred 64-token samples.
SMALL_DATA = ["--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512"]
SMALL_MODEL = ["--model.num_layers", "2", "--model.hidden_size", "64", "--model.num_heads", "4",
               "--model.seq_length", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch_build_tag() -> str:
    """torch's per-interpreter extension subdirectory, e.g. py311_cpu (torch.utils.cpp_extension)."""
    import torch

    device = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    return f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{device}"


def base_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    # XDG_CACHE_HOME points the data cache at the test's copy; torch's extension cache must stay
    # where setup.sh built DeepSpeed's shm op, or every test process would recompile it (~30 s).
    # Without TORCH_EXTENSIONS_DIR torch builds in <cache>/torch_extensions/py<ver>_<cpu|cuXY>;
    # with it, directly inside it -- so the default has to name that subdirectory.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions", _torch_build_tag())
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               XDG_CACHE_HOME=str(cache_dir), TORCH_EXTENSIONS_DIR=extensions, PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A cache dir holding the small default corpus' tokenizer and shards, built once."""
    cache = tmp_path_factory.mktemp("cache")
    from megatron_entropy.data.corpus import prepare_default_data

    prepare_default_data(str(cache / "megatron_entropy"), 512, 300000, log=lambda *_: None)
    return cache


class TrainRun:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc, self.run_dir = proc, run_dir

    @property
    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def losses(self, key: str = "lm_loss") -> list[float]:
        return [r[key] for r in self.kind("train")]


@pytest.fixture
def run_train(data_cache, tmp_path):
    """Run train.py (optionally under a launcher) on the small corpus; returns a TrainRun."""
    counter = iter(range(1000))

    def run(args: list[str], launcher: list[str] | None = None, nproc: int = 1, check: bool = True,
            timeout: int = 300, env_extra: dict | None = None, small: bool = True) -> TrainRun:
        run_dir = tmp_path / f"run{next(counter)}"
        cmd = list(launcher or [sys.executable])
        if launcher is None and nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port())]
        cmd += [str(REPO / "train.py")] + (SMALL_DATA + SMALL_MODEL if small else []) + [
            "--logging.run_dir", str(run_dir), "--logging.wandb", "off", "--logging.progress_bar", "false",
            "--logging.figures", "false"] + args
        env = base_env(data_cache)
        env.update(env_extra or {})
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return TrainRun(proc, run_dir)

    return run
