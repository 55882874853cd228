#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages (MPI, Slurm, munge; when run as root),
# a virtual environment in .venv with torch pinned by constraints.txt, and DeepSpeed's CPU
# communication op compiled once. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin libopenmpi-dev)
command -v numactl >/dev/null 2>&1 || need_apt+=(numactl)
command -v slurmctld >/dev/null 2>&1 || need_apt+=(slurmd slurmctld slurm-client)
command -v munged >/dev/null 2>&1 || need_apt+=(munge)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: note: ${need_apt[*]} missing and not root; MPI/Slurm tests will be skipped" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (about a minute)"
  # torch is pinned by constraints.txt so pip never pulls a multi-GB CUDA build on a CPU machine;
  # DS_BUILD_OPS=0 makes DeepSpeed compile its ops lazily instead of at install time.
  DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,eval]"
  touch "$stamp"
fi

# DeepSpeed JIT-compiles its shared-memory communication op on first use (~30 s); do it once here
# instead of inside the first (timed) training process.
DS_ACCELERATOR=cpu .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)
" >/dev/null 2>&1 || echo "setup: note: could not pre-build DeepSpeed's shm op (it will build on first use)" >&2
echo "setup: done"
