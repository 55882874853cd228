"""Helper for tests/e2e/test_hf_export.py (not a test): in ONE multi-process launch, for several
parallel layouts and every model variant, build the model, perturb its weights (temperatures, alpha,
beta, norms, WN gains: so folding and export have something to get wrong), take one DeepSpeed
training step, save a real checkpoint through training/checkpoint.py, and record the live model's
output on a fixed batch (full logits; the loss under pipeline parallelism) as the export reference.

    torchrun --nproc_per_node 4 tests/e2e/variant_checkpoints.py OUT TOKENIZER LAYOUT [LAYOUT ...]
    LAYOUT = name:tensor:pipeline:zero_stage[:variant,variant,...]   e.g. tp2:2:1:0  zero3:1:1:3

Writes OUT/<layout>/<variant slug>/{checkpoints/..., reference.safetensors}.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_entropy.data.dataset import Batch  # noqa: E402

MODEL = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=16)
BATCH = 2


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant).strip("-").lower()


@torch.no_grad()
def perturb(model, tp_size: int, tp_rank: int) -> None:
    """Layout-independent perturbation: full-size noise from a generator seeded by the canonical name."""
    from megatron_entropy.training import reshard

    names, dims = reshard.canonical_names(model), reshard.partition_dims(model)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for key, param in tensors.items():
        name = names.get(key)
        if name is None or name in reshard.VOCAB_TENSORS or not param.is_floating_point():
            continue
        dim = dims.get(key)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp_size
        gen = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))
        noise = torch.randn(shape, generator=gen)
        if dim is not None:
            noise = noise.chunk(tp_size, dim=dim)[tp_rank]
        if name.endswith("log_temperature"):
            param.add_(0.5 * noise)  # per-head, per-position temperatures around t0
        elif name.endswith("attention.temperature"):
            param.mul_(torch.exp(0.5 * noise))
        elif name.endswith(("ffn.alpha", "ffn.beta")):
            param.copy_(1.0 + 0.3 * noise)
        elif name.endswith("weight_g") or ".norm" in name or "final_norm" in name:
            param.add_(0.1 * noise)
        elif name.endswith(".bias"):
            param.add_(0.05 * noise)
        else:
            param.add_(0.01 * noise)


def reset_deepspeed_groups() -> None:
    from deepspeed.utils import groups

    groups.mpu = None
    groups._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = None
    groups._MPU_TENSOR_MODEL_PARALLEL_RANK = None


def main(argv: list[str]) -> None:
    from megatron_entropy.config import Config
    from megatron_entropy.data.dataset import GlobalBatchSampler
    from megatron_entropy.data.tokenizer import load_tokenizer
    from megatron_entropy.model.variants import VARIANTS
    from megatron_entropy.parallel.state import ParallelState
    from megatron_entropy.training import checkpoint
    from megatron_entropy.training.distributed import init_distributed
    from megatron_entropy.training.engine import build_ds_config
    from megatron_entropy.training.loop import make_model_and_engine
    from megatron_entropy.training.pipeline import batches

    out, tokenizer_path, layouts = Path(argv[0]), argv[1], argv[2:]
    info = init_distributed()
    tokenizer = load_tokenizer(tokenizer_path)
    data = types.SimpleNamespace(tokenizer_path=tokenizer.path, tokenizer_identity=tokenizer.identity)
    world = info.world_size
    for layout in layouts:
        parts = layout.split(":")
        name, tp, pp, zero = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        variants = parts[4].split(",") if len(parts) > 4 else list(VARIANTS)
        state = ParallelState.from_topology(tp, pp)
        for variant in variants:
            cfg = Config()
            for key, value in MODEL.items():
                setattr(cfg.model, key, value)
            cfg.model.variant, cfg.model.vocab_size = variant, tokenizer.vocab_size
            cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
            dp = state.dp_size
            cfg.train.micro_batch_size, cfg.train.global_batch_size = BATCH, BATCH * dp
            cfg.logging.wandb = "off"
            ds_config = build_ds_config(cfg, {"zero_optimization": {"stage": zero}}, world)
            reset_deepspeed_groups()  # DeepSpeed keeps the previous engine's mpu in module globals
            model, engine, _, _ = make_model_and_engine(
                cfg, ds_config, state, info.device, prepare=lambda m: perturb(m, state.tp_size, state.tp_rank))
            gen = torch.Generator().manual_seed(1234)
            tokens = torch.randint(0, cfg.model.vocab_size, (BATCH * dp, MODEL["seq_length"] + 1), generator=gen)
            mine = tokens[state.dp_rank * BATCH:(state.dp_rank + 1) * BATCH]
            inputs, labels = mine[:, :-1].contiguous(), mine[:, 1:].contiguous()
            model.aux_scale.value = 1.0 / cfg.grad_accumulation_steps(world)
            if pp > 1:
                engine.train_batch(iter([(inputs, labels)] * cfg.grad_accumulation_steps(world)))
            else:
                loss = engine(inputs, labels)
                engine.backward(loss)
                engine.step()
            target = out / name / slug(variant)
            sampler = GlobalBatchSampler(100, cfg.train.global_batch_size, seed=cfg.data.seed)
            sampler.next_global_batch()
            checkpoint.save(engine, str(target / "checkpoints"), 1, sampler, cfg, data, state, say=lambda *_: None)
            reference_ids = torch.randint(0, cfg.model.vocab_size, (BATCH, MODEL["seq_length"] + 1),
                                          generator=torch.Generator().manual_seed(99))
            ids, lab = reference_ids[:, :-1].contiguous(), reference_ids[:, 1:].contiguous()
            engine.eval()
            with torch.no_grad():
                if pp > 1:
                    ref = {"input_ids": ids, "labels": lab,
                           "loss": engine.eval_batch(batches(None, [0], lambda *_: Batch(ids, lab), info.device),
                                                     num_micro_batches=1).detach().float().reshape(1)}
                else:
                    ref = {"input_ids": ids, "logits": engine(ids).float()}
            if state.rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ref.items()}, str(target / "reference.safetensors"))
            dist.barrier()
            del engine, model
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    from megatron_entropy.training.distributed import exit_process

    exit_process(0)  # a Gloo worker thread may still hold a collective at exit (see its docstring)
