"""Per-rank workers for the pipeline / 3D-layout tests (run through tests/dist/harness.py).

`train_runs` runs several complete training runs one after another in the same processes — the
code path of train.py (build_config, validate, build_ds_config, training.loop.run) without
paying the interpreter, DeepSpeed import and process-group start-up once per layout.

`pipeline_grads` builds the GPT as a DeepSpeed PipelineModule (PP over all ranks), runs one
train_batch through DeepSpeed's 1F1B schedule and captures every gradient just before the
optimizer step; rank 0 compares them with a single-process GPTModel's gradients for the same
micro-batches (the tied embedding on both of its stages, with and without activation
checkpointing) and returns a JSON report.
"""

from __future__ import annotations

import faulthandler
import os
import time

import torch
import torch.distributed as dist

from megatron_entropy.config import ConfigError, build_config
from megatron_entropy.model.gpt import GPTModel
from megatron_entropy.model.block import DecoderLayer
from megatron_entropy.parallel.state import ParallelState
from megatron_entropy.training.distributed import init_distributed


def train_runs(runs: list[dict]) -> list[dict]:
    """runs: [{"args": [...], "deepspeed": path | None, "expect_error": bool}] -> [{"seconds"} | {"error"}].

    PP_WORKER_STACKS=<seconds> dumps every thread's stack after that long (to find a hang).
    """
    from megatron_entropy.training.engine import build_ds_config, load_ds_config
    from megatron_entropy.training.loop import run

    from deepspeed.utils import groups

    if os.environ.get("PP_WORKER_STACKS"):
        faulthandler.dump_traceback_later(float(os.environ["PP_WORKER_STACKS"]), exit=False)

    info = init_distributed()
    out = []
    for spec in runs:
        groups.mpu = None  # DeepSpeed keeps the previous engine's mpu in a module global
        cfg = build_config("tiny", spec["args"])
        cfg.validate(info.world_size)
        build_ds_config(cfg, load_ds_config(spec.get("deepspeed")), info.world_size)
        started = time.perf_counter()
        try:
            run(cfg, spec.get("deepspeed"), info)
        except ConfigError as e:  # train.py turns this into one line and exit code 2
            if not spec.get("expect_error"):
                raise
            out.append({"error": str(e)})
            continue
        dist.barrier()
        out.append({"seconds": time.perf_counter() - started})
    return out


# ----------------------------------------------------------------------------- gradients

def _canonical_names(model) -> dict[str, torch.nn.Parameter]:
    """Parameter -> GPTModel-style name ("layers.3.attention.q.weight", "embedding.tokens.weight", ...)."""
    from megatron_entropy.training.pipeline import PipelineHead

    names = {}
    for module_name, module in model.named_modules():
        if isinstance(module, DecoderLayer):
            prefix = f"layers.{module.layer_number}."
        elif isinstance(module, PipelineHead):
            prefix = "head."
        elif module_name.startswith("tied_modules.") and module_name.count(".") == 1:
            prefix = "embedding."
        elif type(module).__name__ == "Embedding" and "." not in module_name:
            prefix = "embedding."  # untied: a plain pipeline layer
        else:
            continue
        for name, p in module.named_parameters():
            names[prefix + name] = p
    return names


def pipeline_grads(model_args: dict, micro_batch_size: int, global_batch: int, checkpointing: list[bool],
                   seed: int = 1234) -> dict:
    from megatron_entropy.config import ModelConfig
    from megatron_entropy.training.engine import build_ds_config, initialize
    from megatron_entropy.training.pipeline import build_pipeline_model, set_activation_checkpointing

    info = init_distributed()
    world = info.world_size
    g = torch.Generator().manual_seed(seed)
    cfg_m = ModelConfig(**model_args)
    tokens = torch.randint(0, cfg_m.vocab_size, (global_batch, cfg_m.seq_length + 1), generator=g)
    micro = [tokens[i:i + micro_batch_size] for i in range(0, global_batch, micro_batch_size)]
    micro = [(m[:, :-1].contiguous(), m[:, 1:].contiguous()) for m in micro]
    gas = len(micro)

    report = {"cases": {}}
    reference = _reference_grads(cfg_m, micro, seed) if info.rank == 0 else None
    first = None  # the first case's gradients, to compare the others with bit for bit
    for ckpt in checkpointing:
        cfg = build_config("tiny", ["--parallel.pipeline", str(world), "--train.global_batch_size", str(global_batch),
                                    "--train.micro_batch_size", str(micro_batch_size), "--train.grad_clip", "0"])
        cfg.model = ModelConfig(**model_args)
        state = ParallelState.from_topology(1, world)
        model = build_pipeline_model(cfg.model, state, seed)
        set_activation_checkpointing(model, ckpt)
        engine, optimizer, _ = initialize(cfg, model, build_ds_config(cfg, {}, world), state)
        model.aux_scale.value = 1.0 / gas
        captured = {}

        def capture(opt, args, kwargs):
            for name, p in _canonical_names(model).items():
                if p.grad is not None:
                    captured[name] = p.grad.detach().clone()

        handle = optimizer.register_step_pre_hook(capture) if hasattr(optimizer, "register_step_pre_hook") \
            else torch.optim.Optimizer.register_step_pre_hook(optimizer, capture)
        loss = float(engine.train_batch(iter(micro)))
        handle.remove()
        tied_copies = {}
        if "embedding.tokens.weight" in captured:
            tied_copies[f"stage{state.pp_rank}"] = captured["embedding.tokens.weight"]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"grads": captured, "tied": tied_copies, "stage": state.pp_rank})
        if info.rank == 0:
            ref_grads, ref_loss = reference
            grads, tied = {}, {}
            for item in gathered:
                for name, grad in item["grads"].items():
                    grads.setdefault(name, grad)
                tied.update(item["tied"])
            diffs = {name: _rel(grads[name], ref) for name, ref in ref_grads.items() if name in grads}
            report["cases"][f"checkpointing={ckpt}"] = {
                "loss": loss, "ref_loss": ref_loss,
                "missing": sorted(set(ref_grads) - set(grads)),
                "max_rel": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                "tied": {stage: _rel(grad, ref_grads["embedding.tokens.weight"]) for stage, grad in tied.items()},
                "tied_norm": float(ref_grads["embedding.tokens.weight"].norm()),
            }
            first = first or grads
            report["cases"][f"checkpointing={ckpt}"]["max_abs_vs_first_case"] = max(
                float((grads[name] - first[name]).abs().max()) for name in first)
        dist.barrier()
    return report


def _reference_grads(cfg_m, micro, seed):
    """Single-process GPTModel: sum over micro-batches of loss / GAS, penalties scaled by 1 / GAS."""
    model = GPTModel(cfg_m, ParallelState.single(), seed=seed)
    model.train()
    model.aux_scale.value = 1.0 / len(micro)
    total = 0.0
    for inputs, labels in micro:
        loss = model(inputs, labels)
        (loss / len(micro)).backward()
        total += float(loss) / len(micro)
    names = {}
    for name, p in model.named_parameters():
        names[name] = p.grad.detach().clone()
    return names, total


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))
