#!/usr/bin/env bash
# Export a training checkpoint to a Hugging Face model directory (tools/convert_to_hf.py CKPT OUT),
# on one CPU task; every tensor-parallel shard is merged, padded vocabulary rows are dropped.
#
#   CKPT=runs/ereg-1b-123456 sbatch slurm/convert_to_hf.sh                  # its latest checkpoint
#   CKPT=runs/ereg-1b-123456/checkpoints/step_0020000 OUT=hf/ereg-1b sbatch slurm/convert_to_hf.sh
#   # right after training finishes:
#   job=$(sbatch --parsable slurm/pretrain_1b.sh)
#   CKPT=runs/ereg-1b-$job sbatch --dependency=afterok:$job slurm/convert_to_hf.sh
#
# Environment:
#   CKPT   a checkpoint directory, a save directory holding `latest`, or a run directory  [required]
#   OUT    the Hugging Face output directory                                  [<run dir>/hf/<tag>]
#   EXTRA  more tools/convert_to_hf.py arguments
#   VENV / PYTHON / REPO as in pretrain_1b.sh
#
#SBATCH --job-name=convert-hf
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# Slurm runs a spooled copy of this file: find the checkout from the submitted path (or set REPO).
if [ -z "${REPO:-}" ]; then
  me_script=$0
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    me_script=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p' | head -n 1 || true)
    case $me_script in /*) ;; "") me_script=$0 ;; *) me_script=${SLURM_SUBMIT_DIR:-$PWD}/$me_script ;; esac
  fi
  REPO=$(cd "$(dirname "$me_script")/.." && pwd)
  [ -f "$REPO/train.py" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
fi
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
me_check_repo

me_python_env
[ -n "${CKPT:-}" ] || me_die "set CKPT to a checkpoint, a save directory or a run directory"
[ -f "$REPO/tools/convert_to_hf.py" ] || me_die "$REPO/tools/convert_to_hf.py is missing; update the checkout"
ckpt=${CKPT%/}
if [ -f "$ckpt/checkpoints/latest" ]; then ckpt=$ckpt/checkpoints; fi   # a run directory
if [ -f "$ckpt/latest" ]; then ckpt=$ckpt/$(cat "$ckpt/latest"); fi    # a save directory
[ -d "$ckpt" ] || me_die "CKPT=$CKPT: no checkpoint at $ckpt"
OUT=${OUT:-$(dirname "$ckpt")/../hf/$(basename "$ckpt")}

read -r -a extra <<<"${EXTRA:-}"
me_log "converting $ckpt -> $OUT"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  srun --ntasks 1 "$PYTHON" "$REPO/tools/convert_to_hf.py" "$ckpt" "$OUT" "${extra[@]}"
else
  "$PYTHON" "$REPO/tools/convert_to_hf.py" "$ckpt" "$OUT" "${extra[@]}"
fi
me_log "done: $OUT"
