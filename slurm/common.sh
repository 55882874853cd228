# shellcheck shell=bash
# Shared by the batch scripts in slurm/ (sourced, never run). See slurm/README.md and docs/slurm.md.
#
# Functions:
#   me_check_repo              REPO must be the checkout (the scripts find it before sourcing this)
#   me_python_env              PYTHON, OMP_NUM_THREADS, offline Hugging Face, CPU vs GPU
#   me_dist_env                MASTER_ADDR / MASTER_PORT and the NCCL settings
#   me_train_args ARRAY        train.py arguments from CONFIG, DS_CONFIG, TRAIN_DATA, ..., OVERRIDES
#   me_srun_tasks CMD...       srun CMD once per task with RANK / LOCAL_RANK / WORLD_SIZE set, waiting
#                              through SIGTERM so the ranks can finish their checkpoint

me_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*"; }
me_die() { echo "error: $*" >&2; exit 2; }

# The checkout (each script finds it before sourcing this file; see the preamble of pretrain_1b.sh).
me_check_repo() {
  [ -f "${REPO:-}/train.py" ] || me_die "REPO=${REPO:-} has no train.py; set REPO=/path/to/the/megatron_entropy/checkout"
  export REPO
}

# The interpreter and process-level environment.
me_python_env() {
  VENV=${VENV:-$REPO/.venv}
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=$(command -v python3 || true); fi
  fi
  if [ -z "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
    me_die "no Python: set PYTHON or VENV (looked for $VENV/bin/python)"
  fi
  export PYTHON VENV
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
  export PYTHONUNBUFFERED=1
  # DEVICE=auto: CPU (gloo) when the job asked for no GPUs (--gpus-per-node 0) or the node has none.
  ME_DEVICE=${DEVICE:-auto}
  if [ "$ME_DEVICE" = auto ]; then
    local gpus=${SLURM_GPUS_PER_NODE:-}
    gpus=${gpus##*:}  # "h100:8" -> 8
    if [ "$gpus" = 0 ] || [ ! -e /dev/nvidia0 ]; then ME_DEVICE=cpu; else ME_DEVICE=gpu; fi
  fi
  case $ME_DEVICE in
    cpu) export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" ;;
    gpu) export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} ;;
    *) me_die "DEVICE=$ME_DEVICE must be auto, cpu or gpu" ;;
  esac
}

# Rendezvous and NCCL. Every value can be overridden from the environment.
me_dist_env() {
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1 || true)
    [ -n "$MASTER_ADDR" ] || me_die "scontrol show hostnames $SLURM_JOB_NODELIST gave no host; set MASTER_ADDR"
  fi
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  # Stable for the job (also across requeues), different for jobs sharing a node.
  export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  if [ "$ME_DEVICE" = gpu ]; then
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                             # INFO to debug topology / hangs
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the job, no hang
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                     # InfiniBand retry timeout (4.096us x 2^22)
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # keep TP collectives in issue order
    # Site-specific, only when you set them: NCCL_SOCKET_IFNAME (e.g. ib0 / hsn), NCCL_IB_HCA,
    # NCCL_NET_GDR_LEVEL, FI_PROVIDER (Slingshot/EFA). They pass through the environment untouched.
  fi
}

# Append train.py's arguments to the array named $1.
me_train_args() {
  local -n _args=$1
  _args+=("$REPO/train.py" --config "${CONFIG:-tiny}")
  if [ -n "${DS_CONFIG:-}" ]; then _args+=(--deepspeed "$(me_path "$DS_CONFIG")"); fi
  _args+=(--train.resume auto --logging.run_dir "$RUN_DIR" --logging.progress_bar false)
  if [ -n "${TRAIN_DATA:-}" ]; then _args+=(--data.train_data "$(me_yaml_list "$TRAIN_DATA" paths)"); fi
  if [ -n "${TRAIN_WEIGHTS:-}" ]; then _args+=(--data.train_weights "$(me_yaml_list "$TRAIN_WEIGHTS")"); fi
  if [ -n "${VALID_DATA:-}" ]; then _args+=(--data.valid_data "$(me_yaml_list "$VALID_DATA" paths)"); fi
  if [ -n "${TOKENIZER:-}" ]; then _args+=(--data.tokenizer "$(me_path "$TOKENIZER")"); fi
  if [ -n "${OVERRIDES:-}" ]; then
    local extra
    read -r -a extra <<<"$OVERRIDES"  # word-split, no glob expansion
    _args+=("${extra[@]}")
  fi
}

# A relative path (or shard prefix) missing from the working directory but present in REPO -> REPO's.
me_path() {
  case $1 in /*) echo "$1"; return ;; esac
  if [ ! -e "$1" ] && [ ! -e "$1.json" ] && { [ -e "$REPO/$1" ] || [ -e "$REPO/$1.json" ]; }; then
    echo "$REPO/$1"
  else
    echo "$1"
  fi
}

# "a b c" -> "[a, b, c]" (a YAML list for a dotted override); with a 2nd argument, items are paths.
me_yaml_list() {
  local out="" item items
  read -r -a items <<<"$1"
  for item in "${items[@]}"; do
    if [ -n "${2:-}" ]; then item=$(me_path "$item"); fi
    out+="${out:+, }$item"
  done
  echo "[$out]"
}

# One run directory per job, stable across requeues (same job name and id), so it resumes.
me_run_dir() {
  local name=${SLURM_JOB_NAME:-local}
  name=${name//[^A-Za-z0-9._-]/-}
  RUN_ROOT=${RUN_ROOT:-$REPO/runs}
  export RUN_DIR=${RUN_DIR:-$RUN_ROOT/$name-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
  mkdir -p "$RUN_DIR"
  # The same wandb run across requeues (wandb is used when WANDB_API_KEY is set; offline otherwise).
  export WANDB_RUN_ID=${WANDB_RUN_ID:-$name-${SLURM_JOB_ID:-local}} WANDB_RESUME=${WANDB_RESUME:-allow}
}

# srun the command once per task; each task execs it with the torch.distributed variables set.
# The batch shell ignores SIGTERM while it waits (preemption / scancel send it to every process of
# the job): the ranks turn it into "checkpoint at the next step boundary", and we must not exit first.
me_srun_tasks() {
  local rc=0 pid
  # shellcheck disable=SC2016  # expanded by each task's shell, not here
  srun --kill-on-bad-exit=1 --export=ALL \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' me-task "$@" &
  pid=$!
  trap 'me_log "SIGTERM: waiting for the ranks to checkpoint and exit"' TERM
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do
    rc=0
    wait "$pid" || rc=$?
  done
  trap - TERM
  return "$rc"
}

# The whole pretraining job: environment, run directory, banner, srun. Returns train.py's status.
me_pretrain() {
  me_python_env
  me_dist_env
  me_run_dir
  local -a cmd=("$PYTHON" -u)
  me_train_args cmd
  local tasks=${SLURM_NTASKS:-1}
  me_log "$tasks tasks on ${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-localhost}], device $ME_DEVICE," \
    "restart ${SLURM_RESTART_COUNT:-0}, MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
  me_log "command: ${cmd[*]}"
  printf '%s job %s restart %s: %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-none}" "${SLURM_RESTART_COUNT:-0}" \
    "${cmd[*]}" >>"$RUN_DIR/launches.log"
  local rc=0
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    me_srun_tasks "${cmd[@]}" || rc=$?
  else
    "${cmd[@]}" || rc=$?  # outside Slurm: one process (for a quick local check)
  fi
  me_log "train.py finished with status $rc"
  return "$rc"
}
