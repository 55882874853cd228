"""Adam moments across layouts: read them at full size from a checkpoint of (almost) any layout, and
place them into the optimizer of a run with another TP x PP x DP x ZeRO layout.

Where a checkpoint keeps them
    resharded   optimizer_moments.safetensors (tools/reshard_checkpoint.py writes it), full size
    ZeRO-0      each TP rank's torch optimizer state in mp_rank_TT_model_states.pt ['optimizer'], its
                parameters in the order our metadata's `optimizer_layout` records (fp32 runs)
    ZeRO-1/2    flat fp32 partitions per parameter group in zero_pp_rank_D_mp_rank_TT_optim_states.pt;
                DeepSpeed's `param_slice_mappings` say which slice of rank D's partition belongs to which
                parameter, so a parameter's moment is its slices from DP ranks 0, 1, ... concatenated
                (PP = 1; with PP > 1 the files are per stage and not read here)
    ZeRO-3      not read: such checkpoints reshard with weights only

Where a run takes them
    ZeRO-0 fp32   the torch optimizer's per-parameter state (this TP rank's shard)
    ZeRO-1/2      the flat fp32 partition of each parameter group; each parameter's `_hp_mapping`
                  (DeepSpeed's tensor-fragment map) says which part of it this DP rank holds and where
                  in the partition it lies. Any precision: the partitions are fp32 master copies.

Full-size moments are sharded for the target exactly like the weights (reshard.shard_tensor), and
the Adam step counter comes along, so bias correction continues where the source stopped. A 16-bit
run also gets the checkpoint's fp32 weights as its master copies (place_fp32_masters).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from megatron_entropy.training.checkpoint import CheckpointError
from megatron_entropy.training.reshard import (MOMENTS_FILE, VOCAB_TENSORS, canonical, canonical_names,
                                               partition_dims, safe_load, shard_tensor)

KINDS = ("exp_avg", "exp_avg_sq")
# (Adam step, {canonical name: {"exp_avg": full tensor, "exp_avg_sq": full tensor}})
Moments = tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]


def target_takes_moments(zero: int, precision: str) -> bool:
    """Whether a run with this ZeRO stage and precision can take moments from another layout."""
    return zero in (1, 2) or (zero == 0 and precision == "fp32")


# ----------------------------------------------------------------------------- read

def read_full(reader) -> Moments | None:
    """The checkpoint's Adam moments at full size, vocabulary padding removed; None if it has none we can read."""
    side = reader.path / MOMENTS_FILE
    if side.is_file():
        return _read_side_file(side)
    if reader.zero_stage == 0:
        found = _zero0_shards(reader)
    elif reader.zero_stage in (1, 2) and reader.pp == 1:
        found = _zero12_shards(reader)
    else:
        return None
    if found is None:
        return None
    step, shards = found
    full = {}
    for name in reader.spec:
        if all(name in shards.get(t, {}) for t in range(reader.tp)):
            full[name] = {kind: reader._gather(name, [shards[t][name][kind] for t in range(reader.tp)])
                          for kind in KINDS}
    return torch.as_tensor(step), full


def _read_side_file(path) -> Moments:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    step = flat.pop("__step__")
    moments: dict = {}
    for key, value in flat.items():
        name, kind = key.rsplit("::", 1)
        moments.setdefault(name, {})[kind] = value
    return step, moments


def _zero0_shards(reader):
    """{tp_rank: {name: moments}} from the plain torch optimizer states of an fp32 ZeRO-0 checkpoint."""
    layout = reader.meta.get("optimizer_layout")
    if not layout:
        return None
    shards: dict[int, dict] = defaultdict(dict)
    step = None
    for file, entry in layout.items():
        state = safe_load(reader.path / f"mp_rank_{int(file):02d}_model_states.pt").get("optimizer") or {}
        order = [i for group in state.get("param_groups", []) for i in group["params"]]
        if len(order) != len(entry["names"]):
            return None  # not the plain optimizer state we recorded: do not guess
        for position, name in enumerate(entry["names"]):
            moment = state.get("state", {}).get(order[position])
            if moment and "exp_avg" in moment:
                shards[int(entry["tp_rank"])].setdefault(name, moment)
                step = moment.get("step", step)
    return None if step is None else (step, shards)


def _zero12_shards(reader):
    """{tp_rank: {name: moments}} from the flat fp32 partitions of a ZeRO-1/2 checkpoint (PP = 1)."""
    shards: dict[int, dict] = {}
    step = None
    for t in range(reader.tp):
        # [bf16_]zero_pp_rank_<D>_mp_rank_<TT>_optim_states.pt, in DP rank order
        files = sorted(reader.path.glob(f"*zero_pp_rank_*_mp_rank_{t:02d}_optim_states.pt"),
                       key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
        if not files:
            raise CheckpointError(f"{reader.path} has no ZeRO-{reader.zero_stage} optimizer partitions for "
                                  f"tensor-parallel rank {t}; the checkpoint is incomplete")
        slices: dict[str, dict[str, list]] = {}
        for file in files:
            saved = safe_load(file).get("optimizer_state_dict") or {}
            base, mappings = saved.get("base_optimizer_state"), saved.get("param_slice_mappings")
            if not isinstance(base, dict) or not mappings:
                return None  # an elastic or older layout of DeepSpeed's: do not guess
            for group, mapping in enumerate(mappings):
                flat = base["state"].get(base["param_groups"][group]["params"][0])
                if not flat or "exp_avg" not in flat:
                    return None  # saved before the first optimizer step
                step = flat.get("step", step)
                for key, where in mapping.items():
                    entry = slices.setdefault(canonical(key), {kind: [] for kind in KINDS})
                    for kind in KINDS:
                        entry[kind].append(flat[kind].narrow(0, where.start, where.numel))
        shards[t] = {}
        for name, entry in slices.items():
            if name not in reader.spec:
                continue
            shape = local_shape(reader.spec[name], reader.tp)
            joined = {kind: torch.cat(entry[kind]) for kind in KINDS}
            if joined["exp_avg"].numel() != math.prod(shape):
                raise CheckpointError(f"{reader.path}: the ZeRO partitions of {name} hold "
                                      f"{joined['exp_avg'].numel()} values for a shard of shape {shape}; "
                                      "the checkpoint is inconsistent")
            shards[t][name] = {kind: value.view(shape) for kind, value in joined.items()}
    return None if step is None else (step, shards)


def local_shape(spec: dict, tp: int) -> list[int]:
    """One TP rank's shape of a tensor with this shard spec (global shape, padded vocabulary)."""
    shape = list(spec["shape"])
    if spec["partition_dim"] is not None:
        shape[spec["partition_dim"]] //= tp
    return shape


# ----------------------------------------------------------------------------- place

@torch.no_grad()
def load_into_engine(engine, reader, state) -> int:
    """Place a checkpoint's Adam moments into this run's optimizer; how many parameters got them."""
    optimizer = getattr(engine, "optimizer", None)
    found = read_full(reader) if optimizer is not None else None
    if found is None:
        return 0
    step, moments = found
    local = _local_moments(engine.module, moments, state)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (ZeRO-1/2)
        if getattr(optimizer, "round_robin_gradients", False) and state.dp_size > 1:
            return 0  # DeepSpeed's fragment map does not follow the round-robin order of the flat buffer
        return _place_in_zero_partitions(optimizer, local, step)
    if isinstance(optimizer, torch.optim.Optimizer):  # ZeRO-0, fp32: the torch optimizer itself
        placed = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in local:
                    on_device = {kind: value.to(p.device) for kind, value in local[id(p)].items()}
                    optimizer.state[p] = {"step": step.clone().float().reshape(()), **on_device}
                    placed += 1
        return placed
    return 0


def _local_moments(module, moments: dict, state) -> dict[int, dict[str, torch.Tensor]]:
    """{id(parameter): this rank's shard of its moments}; a tied parameter answers to any of its names."""
    canonical_of = canonical_names(module)
    dims = partition_dims(module)
    padded = getattr(module, "padded_vocab", None)
    local = {}
    for key, p in module.named_parameters(remove_duplicate=False):
        name = canonical_of[key]
        if id(p) in local or name not in moments:
            continue
        spec = {"partition_dim": dims.get(key), "vocab_padded": name in VOCAB_TENSORS}
        shard = {kind: shard_tensor(moments[name][kind], spec, state.tp_size, state.tp_rank, padded).to(torch.float32)
                 for kind in KINDS}
        if any(t.shape != p.shape for t in shard.values()):
            raise CheckpointError(f"Adam moments of {name} do not fit this model's shard {list(p.shape)}")
        local[id(p)] = shard
    return local


def _place_in_zero_partitions(optimizer, local: dict, step: torch.Tensor) -> int:
    placed = 0
    for i, params in enumerate(optimizer.bit16_groups):
        partition = optimizer.single_partition_of_fp32_groups[i]
        buffers = {kind: torch.zeros_like(partition) for kind in KINDS}
        found = 0
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or id(p) not in local:
                continue  # not in this DP rank's partition, or no moments for it
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for kind in KINDS:
                value = local[id(p)][kind].reshape(-1).narrow(0, lp.start, lp.numel)
                buffers[kind].narrow(0, hp.start, hp.numel).copy_(value)
            found += 1
        if found:
            optimizer.optimizer.state[partition] = {"step": step.clone().float().reshape(()), **buffers}
            placed += found
    return placed


@torch.no_grad()
def place_fp32_masters(engine, tensors: dict[str, torch.Tensor]) -> int:
    """Write a checkpoint's fp32 weights (this rank's shards, canonical names) into a bf16/fp16 run's
    fp32 master partitions (ZeRO-1/2 and DeepSpeed's bf16 optimizer), which DeepSpeed would otherwise
    build by widening the 16-bit copies; returns how many parameters of this rank's partition got them."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = engine.module
    canonical_of = canonical_names(module)
    done = set()
    for key, p in module.named_parameters(remove_duplicate=False):
        value = tensors.get(canonical_of[key])
        if id(p) in done or getattr(p, "_hp_mapping", None) is None or value is None or value.dtype != torch.float32:
            continue  # seen (tied), not in this DP rank's partition, or no fp32 value to give
        safe_set_full_fp32_param(p, value.to(p.device))
        done.add(id(p))
    return len(done)
