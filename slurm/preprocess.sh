#!/usr/bin/env bash
# Tokenize a corpus into memory-mapped token shards once, offline, on one CPU node
# (tools/preprocess_data.py; the format is in docs/data.md). Training jobs then only read them.
#
#   INPUT='corpus/*.jsonl' TOKENIZER=tok/tokenizer.model OUTPUT_PREFIX=data/train sbatch slurm/preprocess.sh
#   # the paper's CodeParrot data (needs the dataset in the HF cache, or HF_HUB_OFFLINE=0 with network):
#   HF_DATASET=huggingface-course/codeparrot-ds-train JSON_KEY=content OUTPUT_PREFIX=data/codeparrot_train \
#     sbatch slurm/preprocess.sh
#   HF_DATASET=huggingface-course/codeparrot-ds-valid HF_SPLIT=validation JSON_KEY=content \
#     OUTPUT_PREFIX=data/codeparrot_valid sbatch slurm/preprocess.sh
#
# Environment:
#   INPUT          local .txt/.jsonl/.parquet files, directories or globs, space-separated (or HF_DATASET)
#   HF_DATASET     a Hugging Face dataset name or local dataset directory (or INPUT)
#   HF_SPLIT       dataset split                                                        [train]
#   HF_CONFIG      dataset configuration name                                           []
#   JSON_KEY       text field of .jsonl/.parquet/HF records                             [text]
#   TOKENIZER      SentencePiece .model file or tokenizer directory                     [tok/tokenizer.model]
#   VOCAB_SIZE     if TOKENIZER does not exist: train a SentencePiece tokenizer of this size on INPUT first
#                  (tools/train_tokenizer.py reads INPUT as plain text: use .txt/.py sources for it)
#   OUTPUT_PREFIX  writes PREFIX.bin, PREFIX.idx, PREFIX.json (Megatron format + sidecar) [data/train]
#   WORKERS        tokenizer processes                                                  [$SLURM_CPUS_PER_TASK]
#   EXTRA          more tools/preprocess_data.py arguments (e.g. --overwrite --txt-mode line)
#   VENV / PYTHON / REPO as in pretrain_1b.sh
# The shard appears atomically when complete (temporary names, then a rename), so a training job
# can never read a half-written one; run this before (or --dependency=afterok:<this job>) training.
#
#SBATCH --job-name=preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
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

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-0}  # may download
me_python_env
TOKENIZER=${TOKENIZER:-tok/tokenizer.model}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-data/train}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-4}}
mkdir -p "$(dirname "$OUTPUT_PREFIX")"

read -r -a inputs <<<"${INPUT:-}"
if [ -n "${HF_DATASET:-}" ]; then
  source_args=(--hf-dataset "$HF_DATASET" --split "${HF_SPLIT:-train}")
  if [ -n "${HF_CONFIG:-}" ]; then source_args+=(--hf-config "$HF_CONFIG"); fi
elif [ ${#inputs[@]} -gt 0 ]; then
  source_args=(--input "${inputs[@]}")
else
  me_die "set INPUT (files, directories or globs) or HF_DATASET"
fi

run() { if [ -n "${SLURM_JOB_ID:-}" ]; then srun --ntasks 1 "$@"; else "$@"; fi; }

if [ ! -e "$TOKENIZER" ]; then
  [ -n "${VOCAB_SIZE:-}" ] || me_die "TOKENIZER=$TOKENIZER does not exist; make one or set VOCAB_SIZE to train it on INPUT"
  [ ${#inputs[@]} -gt 0 ] || me_die "training a tokenizer needs INPUT files (tools/train_tokenizer.py --input)"
  tok_dir=$TOKENIZER
  case $TOKENIZER in *.model) tok_dir=$(dirname "$TOKENIZER") ;; esac
  me_log "training a $VOCAB_SIZE-token SentencePiece tokenizer into $tok_dir"
  run "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "${inputs[@]}" --vocab-size "$VOCAB_SIZE" --output "$tok_dir"
fi

read -r -a extra <<<"${EXTRA:-}"
me_log "tokenizing into $OUTPUT_PREFIX with $WORKERS workers"
run "$PYTHON" "$REPO/tools/preprocess_data.py" "${source_args[@]}" --json-key "${JSON_KEY:-text}" \
  --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT_PREFIX" --workers "$WORKERS" "${extra[@]}"
me_log "done: $(cat "$OUTPUT_PREFIX.json")"
