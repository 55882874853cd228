"""DeepSpeed engine setup: our config -> DeepSpeed config, optimizer, schedule, initialize().

Our config is the single source of truth (DESIGN.md decision 9). A `--deepspeed` JSON supplies
what only DeepSpeed knows (ZeRO stage and its knobs, offload, communication settings); any value it
sets that our config also decides (batch sizes, accumulation, clipping, precision) must agree with
ours, else it is an error naming both. "auto" is accepted and filled in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_entropy.config import Config, ConfigError
from megatron_entropy.model.gpt import parameter_groups

# DeepSpeed's pipeline engine refuses ZeRO-2/3 (it partitions gradients per micro-batch).
MAX_ZERO_STAGE_WITH_PIPELINE = 1


def load_ds_config(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass one of ds_configs/*.json")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(cfg: Config, user: dict, world_size: int, source: str = "the DeepSpeed config") -> dict:
    """Merge our values into the user's DeepSpeed config, refusing contradictions."""
    t = cfg.train
    dp = cfg.data_parallel_size(world_size)
    ours = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(world_size),
        "gradient_clipping": t.grad_clip,
    }
    keys = {
        "train_batch_size": "train.global_batch_size",
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": f"train.global_batch_size / (train.micro_batch_size x DP={dp})",
        "gradient_clipping": "train.grad_clip",
    }
    merged = dict(user)
    for key, value in ours.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and float(theirs) != float(value):
            raise ConfigError(
                f"{source} sets {key}={theirs} but our config gives {value} ({keys[key]}); "
                f"remove {key} from {source} or change {keys[key].split(' ')[0]}"
            )
        merged[key] = value
    for section, key in (("optimizer", "train.lr etc."), ("scheduler", "train.lr_decay / warmup_steps")):
        if section in user:
            raise ConfigError(
                f"{source} has a '{section}' section; the optimizer and schedule come from our config "
                f"({key}): remove the section"
            )
    for name in ("bf16", "fp16"):
        enabled = user.get(name, {}).get("enabled", "auto")
        want = t.precision == name
        if enabled != "auto" and bool(enabled) != want:
            raise ConfigError(
                f"{source} sets {name}.enabled={enabled} but train.precision={t.precision}; "
                f"remove it or pass --train.precision {name if enabled else 'fp32'}"
            )
        merged[name] = dict(user.get(name, {}), enabled=want)
    if t.precision == "fp16":
        merged["fp16"].setdefault("initial_scale_power", 16)
    if cfg.parallel.pipeline > 1 and zero_stage(user) > MAX_ZERO_STAGE_WITH_PIPELINE:
        raise ConfigError(
            f"ZeRO stage {zero_stage(user)} cannot be combined with pipeline parallelism "
            f"(parallel.pipeline={cfg.parallel.pipeline}); use ds_configs/zero0.json or zero1.json, "
            "or set --parallel.pipeline 1 for ZeRO-2/3"
        )
    merged.setdefault("steps_per_print", 10**9)  # we log ourselves
    merged.setdefault("wall_clock_breakdown", False)
    merged["zero_allow_untested_optimizer"] = True  # a plain torch AdamW avoids compiling FusedAdam
    return merged


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine/linear decay from lr to min_lr at max_steps (Megatron style)."""
    t = cfg.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_decay == "cosine" else 1 - progress
        return (t.min_lr + (t.lr - t.min_lr) * shape) / t.lr

    return factor


def make_optimizer(cfg: Config, model: torch.nn.Module):
    t = cfg.train
    optimizer = torch.optim.AdamW(
        parameter_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler


class TensorParallelMPU:
    """The `mpu` interface DeepSpeed asks for, backed by our ParallelState.

    DeepSpeed uses it to reduce gradients over the data-parallel group only and to count each
    tensor-parallel shard once in the global gradient norm.
    """

    def __init__(self, state):
        self.state = state

    def get_model_parallel_rank(self):
        return self.state.tp_rank

    def get_model_parallel_world_size(self):
        return self.state.tp_size

    def get_model_parallel_group(self):
        return self.state.tp_group

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Tell DeepSpeed which parameters are TP shards (so replicated ones are not over-counted)."""
    for p in model.parameters():
        sharded = getattr(p, "partition_dim", None) is not None
        p.tensor_model_parallel = sharded
        p.model_parallel = sharded


def initialize(cfg: Config, model, ds_config: dict, state):
    """deepspeed.initialize with our optimizer and schedule; returns (engine, optimizer, scheduler)."""
    import deepspeed

    optimizer, scheduler = make_optimizer(cfg, model)
    mpu = None
    if getattr(model, "is_pipeline", False):
        # A PipelineModule brings its own grid (from the same topology) as DeepSpeed's mpu.
        from megatron_entropy.training.pipeline import check_param_groups_for_zero, mark_parameters_for_grad_norm

        check_param_groups_for_zero(model, zero_stage(ds_config), state)
        mark_parameters_for_grad_norm(model, state)
    elif state.tp_size > 1:
        mark_tensor_parallel_params(model)
        mpu = TensorParallelMPU(state)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu,
    )
    _record_fp32_grad_norm(engine)
    return engine, optimizer, scheduler


def _record_fp32_grad_norm(engine) -> None:
    """Keep the norm that DeepSpeed's ZeRO-0 fp32 clipping computes (it throws it away).

    Every other path (ZeRO >= 1, bf16, fp16) stores it for get_global_grad_norm(); without this the
    plain engine would log grad_norm = null.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
