"""`train.py --dry-run`: everything a job checks before its first step, on one process, no allocation.

Run on a login node before `sbatch`: it validates the config (ours and DeepSpeed's, parsed by
DeepSpeed itself), the data and tokenizer paths, builds the configured model at full shape on
PyTorch's meta device -- one tensor-parallel rank of every pipeline stage, as the job would --
prints the per-rank parameter table, checks it against the planner's arithmetic
(analysis/plan.py), prints the planner's memory and step-time estimate, and exits 0. Nothing is
written and no process group is created.
"""

from __future__ import annotations

import torch

from megatron_entropy.analysis import plan
from megatron_entropy.analysis.plan_report import GPUS, print_report, report
from megatron_entropy.config import Config, ConfigError
from megatron_entropy.model.gpt import GPTModel
from megatron_entropy.parallel.state import ParallelState
from megatron_entropy.training import pipeline
from megatron_entropy.training.engine import build_ds_config, load_ds_config, zero_stage


def resolve_vocab(cfg: Config, log) -> None:
    """model.vocab_size as the run would set it: the tokenizer's, the shards', or the embedded
    corpus tokenizer's configured size (not trained here: a dry run writes nothing)."""
    if cfg.model.vocab_size is not None:
        return
    d = cfg.data
    if d.train_data:
        from megatron_entropy.training.loop import RunData  # opens shard headers and the tokenizer only

        RunData(cfg, log, check_tokens=False)  # sets model.vocab_size; DataError for bad paths
    else:
        cfg.model.vocab_size = d.tokenizer_vocab_size
        log(f"data: the embedded corpus, vocabulary {d.tokenizer_vocab_size} (data.tokenizer_vocab_size)")


def validate_deepspeed(cfg: Config, ds_path: str | None, world_size: int) -> dict:
    """Our merge rules (engine.build_ds_config), then DeepSpeed's own parser on the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    merged = build_ds_config(cfg, load_ds_config(ds_path), world_size, source=ds_path or "the DeepSpeed config")
    # DeepSpeed checks batch = micro x accumulation x its world size, which is 1 without a process
    # group; build_ds_config already checked that product against the real data-parallel size.
    single = dict(merged, train_batch_size=merged["train_micro_batch_size_per_gpu"]
                  * merged["gradient_accumulation_steps"])
    try:
        DeepSpeedConfig(single)
    except Exception as e:  # noqa: BLE001 -- DeepSpeed raises assertion / pydantic / value errors
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()][:3] or [type(e).__name__]
        raise ConfigError(f"{ds_path}: DeepSpeed rejects the merged config: {'; '.join(lines)}; "
                          "compare it with ds_configs/*.json") from None
    return merged


def meta_model(cfg: Config, state: ParallelState) -> GPTModel:
    """The full-shape model of one rank, on the meta device (shapes and dtypes, no storage)."""
    with torch.device("meta"):
        model = GPTModel(cfg.model, state, seed=cfg.train.seed)
    pipeline.set_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    return model


def parameter_table(cfg: Config, world_size: int, log) -> list[int]:
    """Per-rank parameter counts of each pipeline stage, from meta models; must equal the planner's."""
    p = cfg.parallel
    shape = plan.ModelShape.from_model_config(cfg.model)
    stage_layers = plan.stage_layers(shape, p.tensor, p.pipeline, p.pipeline_partition)
    expected = plan.stage_params(shape, p.tensor, p.pipeline, p.pipeline_partition)
    counts = []
    for tp_rank in sorted({0, p.tensor - 1}):
        state = ParallelState(world_size=world_size, tp_size=p.tensor, pp_size=p.pipeline,
                              dp_size=world_size // (p.tensor * p.pipeline), tp_rank=tp_rank)
        model = meta_model(cfg, state)
        per_layer = sum(t.numel() for t in model.layers[0].parameters())
        embedding = sum(t.numel() for t in model.embedding.parameters())
        head = sum(t.numel() for t in model.head.parameters() if not any(t is e for e in model.embedding.parameters()))
        if tp_rank == 0:
            log(f"per-rank parameters (TP rank {tp_rank} of {p.tensor}; meta device, "
                f"dtype {next(model.parameters()).dtype} before DeepSpeed casts to {cfg.train.precision}):")
            rows = list(model.embedding.named_parameters(prefix="embedding"))
            rows += list(model.layers[0].named_parameters(prefix=f"layers.0 (of {cfg.model.num_layers})"))
            tied = {id(t) for t in model.embedding.parameters()}
            rows += [(n, t) for n, t in model.head.named_parameters(prefix="head") if id(t) not in tied]
            for name, t in rows:
                log(f"    {name:46s} {str(tuple(t.shape)):>14s} {t.numel():>13,}")
        counts = []
        first = 0
        for stage, layers in enumerate(stage_layers):
            n = layers * per_layer + (embedding if stage == 0 else 0)
            if stage == p.pipeline - 1:
                n += head + (embedding if cfg.model.tie_embeddings and p.pipeline > 1 else 0)
            counts.append(n)
            if tp_rank == 0:
                log(f"  stage {stage}: layers {first}..{first + layers - 1}, {n:,} parameters per rank")
            first += layers
        if counts != expected:
            raise RuntimeError(f"the planner counts {expected} parameters per stage but the model has {counts}: "
                               "analysis/plan.py no longer matches model/")
    return counts


def check_options(options: dict, default_world: int) -> int:
    """The world size to plan for (--world-size, else the launcher's); ConfigError for bad values."""
    if options["gpu"] not in GPUS:
        raise ConfigError(f"--gpu {options['gpu']} is unknown; choose one of {', '.join(sorted(GPUS))}")
    raw = options["world_size"]
    if raw is None:
        return default_world
    if not str(raw).isdigit() or int(raw) < 1:
        raise ConfigError(f"--world-size {raw} must be a positive integer (the job's number of processes)")
    return int(raw)


def dry_run(cfg: Config, ds_path: str | None, world_size: int, gpu: str = "h100", log=print) -> int:
    """Validate everything and print the plan. Raises ConfigError / DataError for bad input."""
    resolve_vocab(cfg, log)
    merged = validate_deepspeed(cfg, ds_path, world_size)
    zero = zero_stage(merged)
    offload = any(k in merged.get("zero_optimization", {}) for k in ("offload_optimizer", "offload_param"))
    log(f"config: valid for {world_size} processes (TP{cfg.parallel.tensor} PP{cfg.parallel.pipeline} "
        f"DP{cfg.data_parallel_size(world_size)}, ZeRO-{zero}{' + offload' if offload else ''}, "
        f"{cfg.grad_accumulation_steps(world_size)} accumulation steps); DeepSpeed accepts "
        f"{ds_path or 'the default config'}")
    parameter_table(cfg, world_size, log)
    per_node = 8 if world_size % 8 == 0 else world_size
    lay = plan.Layout(nodes=world_size // per_node, gpus_per_node=per_node, tensor=cfg.parallel.tensor,
                      pipeline=cfg.parallel.pipeline, zero=zero, micro_batch=cfg.train.micro_batch_size,
                      global_batch=cfg.train.global_batch_size, precision=cfg.train.precision,
                      recompute=cfg.parallel.activation_checkpointing, offload=offload, gpu_memory_gib=GPUS[gpu],
                      device="cpu" if gpu == "cpu" else "cuda", partition=cfg.parallel.pipeline_partition)
    peak = plan.GPU_PEAK_TFLOPS.get(gpu, 1.0)
    print_report(report(cfg, lay, plan.ASSUMED_MFU, peak), f"plan ({gpu}, {per_node} per node)")
    log("dry run: OK (nothing was allocated or written)")
    return 0

