#!/usr/bin/env bash
# Multi-node pretraining of configs/1b.yaml: a ~1B-parameter softmax-only EReg GPT (T=2048, TP2),
# one task per GPU through srun, ZeRO-1, resumable, requeued on preemption and before the time limit.
#
#   sbatch slurm/pretrain_1b.sh                                  # 4 nodes x 8 GPUs, as below
#   sbatch --nodes 16 --time 48:00:00 slurm/pretrain_1b.sh      # any #SBATCH line can be overridden
#   TRAIN_DATA="data/code_train data/web_train" TRAIN_WEIGHTS="0.7 0.3" VALID_DATA=data/code_valid \
#     TOKENIZER=tok/tokenizer.model sbatch slurm/pretrain_1b.sh
#   # the same script on a CPU-only single node (what CI runs): tiny config, 4 tasks, TP2 x DP2
#   sbatch --nodes 1 --ntasks 4 --gpus-per-node 0 \
#     --export=ALL,CONFIG=tiny,OVERRIDES="--parallel.tensor 2 --train.max_steps 50" slurm/pretrain_1b.sh
#
# Environment (all optional; sbatch passes your environment on, or use --export=ALL,NAME=value —
# a value containing a comma must be exported in the shell instead, as --export splits on commas):
#   CONFIG        preset name (configs/*.yaml) or a YAML path               [1b]
#   OVERRIDES     extra train.py arguments, split on whitespace             []
#                 e.g. "--train.max_steps 5000 --model.variant SM+LN+G"
#   DS_CONFIG     DeepSpeed JSON; relative paths are taken from REPO          [ds_configs/zero1.json]
#   TRAIN_DATA    token shard prefixes, space-separated (tools/preprocess_data.py / slurm/preprocess.sh)
#                                                                           [the config's; none: embedded corpus]
#   TRAIN_WEIGHTS blend weights, one per TRAIN_DATA prefix (data.train_weights) [none: concatenate]
#   VALID_DATA    validation shard prefixes, space-separated                []
#   TOKENIZER     tokenizer .model file or directory (data.tokenizer)       [the config's]
#   RUN_ROOT      parent of the run directories                             [$REPO/runs]
#   RUN_DIR       this job's run directory (metrics, checkpoints, wandb)    [$RUN_ROOT/<job name>-<job id>]
#   VENV / PYTHON the virtual environment / its interpreter                 [$REPO/.venv / $VENV/bin/python]
#   REPO          the megatron_entropy checkout                             [found from the submitted script]
#   DEVICE        auto | gpu | cpu (auto: cpu with --gpus-per-node 0 or no GPU)  [auto]
#   MASTER_PORT   rendezvous port on the first node                          [20000 + job id % 20000]
#   WANDB_API_KEY set it to log online to wandb (offline files otherwise); the wandb run id is
#                 <job name>-<job id>, so a requeued job continues the same run
#   NCCL_*        see slurm/common.sh (defaults: NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=1,
#                 NCCL_IB_TIMEOUT=22, CUDA_DEVICE_MAX_CONNECTIONS=1); set NCCL_SOCKET_IFNAME etc. yourself
#
# Preemption and time limits: Slurm sends SIGUSR1 to every rank 10 minutes before the time limit
# (--signal below) and SIGTERM on preemption; `scancel --signal=USR1 <job>` does it by hand. The
# ranks agree at the next step boundary, every rank saves, rank 0 runs `scontrol requeue` and the
# job comes back (after Slurm's requeue delay, about 2 minutes) resuming from <run dir>/checkpoints/latest.
#
#SBATCH --job-name=ereg-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
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

CONFIG=${CONFIG:-1b}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
me_pretrain
