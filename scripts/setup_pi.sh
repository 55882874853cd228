#!/usr/bin/env bash
# The private-inference (PI) environment: SecretFlow's SPU (a two-party MPC compiler and runtime)
# with the JAX it compiles from, in its own virtual environment .venv-pi. SPU 0.9.5 needs
# jax <= 0.4.34 and numpy < 2, which conflict with the main .venv, so the two never share packages:
# the main environment exports a folded model (tools/convert_to_hf.py --fold, safetensors) and
# tools/pi_measure.py reads it here. Idempotent: a second run takes a second.
#
#   bash scripts/setup_pi.sh            (or: make pi-setup)
#   PYTHON=python3.11 bash scripts/setup_pi.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PI_VENV:-.venv-pi}
PYTHON=${PYTHON:-python3}
# spu ships wheels for CPython 3.11 only (x86-64 / aarch64 Linux, macOS).
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  for candidate in python3.11 /usr/bin/python3.11; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "setup_pi: error: SPU needs CPython 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

# Pinned: the versions every measurement in docs/pi.md was taken with.
PACKAGES=(spu==0.9.5 "jax[cpu]==0.4.34" jaxlib==0.4.34 "numpy==1.26.4" "safetensors==0.4.5" "tqdm==4.67.1")
stamp="$VENV/.installed-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup_pi: $VENV is up to date"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
echo "setup_pi: installing ${PACKAGES[*]} into $VENV (about 80 MB of wheels)"
"$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
"$VENV/bin/python" -c "import spu, jax, numpy; assert numpy.__version__.startswith('1.')" \
  || { echo "setup_pi: error: $VENV does not import spu/jax after installing" >&2; exit 1; }
touch "$stamp"
echo "setup_pi: done in $(( $(date +%s) - start )) s"
