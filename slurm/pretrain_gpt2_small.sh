#!/usr/bin/env bash
# The paper's GPT-2 small recipe (Table 3): L12 H12 d768, CodeParrot, T=128, global batch 512
# (configs/gpt2_small_codeparrot_t128.yaml), any variant, on one node of 4 GPUs (DP4 x 4 accumulation).
#
#   sbatch slurm/pretrain_gpt2_small.sh                                      # EReg(SM(t)+ScFuFFN)
#   VARIANT=SM+LN+G sbatch --job-name gpt2s-sm-ln-g slurm/pretrain_gpt2_small.sh
#   for v in SM+LN+G SM+LN+R SM+ScFuFFN 'EReg(SM(t)+ScFuFFN)'; do
#     VARIANT=$v sbatch --job-name "gpt2s-${v//[^A-Za-z0-9]/-}" slurm/pretrain_gpt2_small.sh; done
#
# Data: token shards made by slurm/preprocess.sh (docs/data.md), by default
#   data/codeparrot_train(.bin/.idx/.json), data/codeparrot_valid, tokenizer tok/tokenizer.model.
#
# Environment: everything slurm/pretrain_1b.sh reads (CONFIG, OVERRIDES, DS_CONFIG, TRAIN_DATA,
# TRAIN_WEIGHTS, VALID_DATA, TOKENIZER, RUN_ROOT, RUN_DIR, VENV, PYTHON, REPO, DEVICE, MASTER_PORT,
# WANDB_API_KEY, NCCL_*), plus
#   VARIANT       model.variant (model/variants.py)                        [EReg(SM(t)+ScFuFFN)]
# Defaults here: CONFIG=gpt2_small_codeparrot_t128, DS_CONFIG=ds_configs/zero1.json,
# TRAIN_DATA=data/codeparrot_train, VALID_DATA=data/codeparrot_valid, TOKENIZER=tok/tokenizer.model.
# Preemption / time limit: as pretrain_1b.sh (save at the next step, requeue, resume from latest).
#
#SBATCH --job-name=gpt2s-codeparrot
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
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

CONFIG=${CONFIG:-gpt2_small_codeparrot_t128}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
TRAIN_DATA=${TRAIN_DATA-data/codeparrot_train}
VALID_DATA=${VALID_DATA-data/codeparrot_valid}
TOKENIZER=${TOKENIZER-tok/tokenizer.model}
VARIANT=${VARIANT:-EReg(SM(t)+ScFuFFN)}
OVERRIDES="--model.variant $VARIANT ${OVERRIDES:-}"
me_pretrain
