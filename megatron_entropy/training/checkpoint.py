"""Checkpoints: a DeepSpeed checkpoint plus our JSON metadata (DESIGN.md decision 8).

Layout:  <save_dir>/<tag>/            DeepSpeed's files (model and optimizer states per rank)
         <save_dir>/<tag>/megatron_entropy.json   config, layout, data-order state, versions
         <save_dir>/latest            the tag of the newest *complete* checkpoint
`latest` is written by rank 0 only after every rank has finished writing (a barrier), through a
temporary file and an atomic rename, so a run killed mid-save leaves it on the previous complete
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

METADATA_NAME = "megatron_entropy.json"
METADATA_VERSION = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A one-line, user-facing checkpoint problem."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _barrier(state) -> None:
    if state.world_size > 1:
        dist.barrier()


def _versions() -> dict:
    import deepspeed

    import megatron_entropy

    return {"megatron_entropy": megatron_entropy.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}


def shard_spec(model: torch.nn.Module) -> dict:
    """For every parameter: its local shape and the dimension it is split along over TP (or None)."""
    return {name: {"local_shape": list(p.shape), "partition_dim": getattr(p, "partition_dim", None)}
            for name, p in model.named_parameters()}


def metadata(step: int, sampler, cfg, data, state, model) -> dict:
    return {
        "format_version": METADATA_VERSION,
        "step": step,
        "config": cfg.to_dict(),
        "layout": {"world_size": state.world_size, "tensor": state.tp_size, "pipeline": state.pp_size,
                   "data": state.dp_size},
        "padded_vocab_size": model.padded_vocab if hasattr(model, "padded_vocab") else None,
        "true_vocab_size": cfg.model.vocab_size,
        "variant_spec": cfg.model.spec().to_dict(),
        "sampler": sampler.state_dict(),
        "data_seed": cfg.data.seed,
        "tokenizer": {"path": data.tokenizer_path, "identity": data.tokenizer_identity},
        "shard_spec": shard_spec(model),
        "versions": _versions(),
    }


def save(engine, save_dir: str, step: int, sampler, cfg, data, state, say=print) -> Path:
    tag = tag_for(step)
    root = Path(save_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    if state.rank == 0:
        meta = metadata(step, sampler, cfg, data, state, engine.module)
        tmp = root / tag / (METADATA_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / tag / METADATA_NAME)
    _barrier(state)  # every rank's files are on disk before `latest` moves
    if state.rank == 0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        _prune(root, cfg.train.keep_last, keep=tag)
        say(f"saved checkpoint {root / tag}")
    _barrier(state)
    return root / tag


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step_*") if (p / METADATA_NAME).is_file())
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(root / old, ignore_errors=True)


def read_metadata(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / METADATA_NAME
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a megatron_entropy checkpoint (no {METADATA_NAME}); "
                              "pass a directory written by train.py")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt (not JSON); use an earlier checkpoint") from None
    if meta.get("format_version", 0) > METADATA_VERSION:
        raise CheckpointError(f"{path} has metadata version {meta.get('format_version')} but this "
                              f"megatron_entropy reads up to {METADATA_VERSION}; upgrade megatron_entropy")
    return meta


def resolve(save_dir: str, resume: str) -> Path | None:
    """'auto' -> <save_dir>/latest's tag (None if there is none yet); a path -> that checkpoint."""
    if resume == "auto":
        latest = Path(save_dir) / LATEST
        if not latest.is_file():
            return None
        return Path(save_dir) / latest.read_text().strip()
    path = Path(resume)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {resume} does not exist; pass a checkpoint directory or 'auto'")
    return path


def resume(engine, sampler, save_dir: str, resume_from: str, say=print) -> int:
    """Load model, optimizer, scheduler and data order; return the step to continue after."""
    path = resolve(save_dir, resume_from)
    if path is None:
        say(f"no checkpoint in {save_dir} yet; starting from scratch")
        return 0
    meta = read_metadata(path)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}; is it complete?")
    sampler.load_state_dict(meta["sampler"])
    say(f"resumed from {path} (step {meta['step']})")
    return int(meta["step"])
