"""Checkpoints: a DeepSpeed checkpoint plus our JSON metadata (DESIGN.md decision 8).

Layout:  <save_dir>/<tag>/                          DeepSpeed's files (weights and optimizer states)
         <save_dir>/<tag>/rng_state_rankNNNNN.json  each rank's python / numpy / torch RNG state
         <save_dir>/<tag>/tokenizer.model           a copy of the training tokenizer (self-contained)
         <save_dir>/<tag>/megatron_entropy.json     config, layout, shard spec, data order, files, versions
         <save_dir>/latest                          the tag of the newest *complete* checkpoint

Saving: every rank writes its DeepSpeed files and RNG state; a barrier; rank 0 writes the metadata
(which lists every file with its size, so a truncated file is caught before loading) and only then
moves `latest` (temporary file + atomic rename). A run killed at any point of a save leaves `latest`
on the previous complete checkpoint. The last `train.keep_last` checkpoints are kept.

Resuming (`--train.resume auto | PATH`):
  * same TP and PP, and DeepSpeed can take the optimizer state as saved (ZeRO-0 with any DP size,
    or the same ZeRO stage and DP size): DeepSpeed loads everything (weights, optimizer, LR schedule,
    counters); with the data position and RNG states the run continues bit-identically.
  * otherwise (another TP/PP layout, another ZeRO stage or DP size, or a weights-only checkpoint from
    tools/reshard_checkpoint.py or tools/convert_from_hf.py): the weights go through the shard spec
    (training/reshard.py) into the model *before* DeepSpeed wraps it; the LR schedule, step counters
    and data position are restored; the optimizer state (Adam moments) starts fresh, and the run
    says so.
Nothing is unpickled beyond tensors and plain containers (reshard.safe_load).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

METADATA_NAME = "megatron_entropy.json"
METADATA_VERSION = 2
LATEST = "latest"
RNG_FILE = "rng_state_rank{rank:05d}.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_DIR = "tokenizer"
# Test hook: "STEP:MARKER" makes rank 0 create MARKER and sleep inside the save of STEP, after every
# file and the metadata are written but before `latest` moves (tests kill the run there).
PAUSE_ENV = "MEGATRON_ENTROPY_TEST_PAUSE_BEFORE_LATEST"


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


# ----------------------------------------------------------------------------- RNG (JSON, never pickle)

def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- metadata

def records_optimizer_order(zero: int, precision: str) -> bool:
    """fp32 ZeRO-0 checkpoints keep plain torch optimizer state, whose parameters are known only by
    position: the metadata records their names so the moments can move to another layout. (ZeRO-1/2
    checkpoints name them themselves, in DeepSpeed's param_slice_mappings; see training/moments.py.)"""
    return zero == 0 and precision == "fp32"


def optimizer_order(engine, state) -> dict | None:
    """This rank's DeepSpeed model file and the canonical names of its optimizer's parameters, in the
    order of the torch optimizer state dict saved there (ZeRO-0)."""
    from megatron_entropy.training import reshard

    if state.dp_rank != 0 or getattr(engine, "optimizer", None) is None:
        return None
    module = engine.module
    canonical = reshard.canonical_names(module)
    key_of = {id(p): k for k, p in module.named_parameters(remove_duplicate=False)}
    names = [canonical[key_of[id(p)]] for group in engine.optimizer.param_groups for p in group["params"]]
    return {"file": int(getattr(engine, "checkpoint_mp_rank", state.tp_rank)), "tp_rank": state.tp_rank,
            "names": names}


def model_spec(engine, state, carry_moments: bool = False) -> dict:
    """The global shard spec and pipeline layer map (collective: every rank contributes its tensors)."""
    cached = getattr(engine, "_megatron_entropy_spec", None)
    if cached is not None:
        return cached
    from megatron_entropy.training import reshard

    module = engine.module
    local = {"tensors": reshard.local_spec(module, state.tp_size),
             "layers": reshard.pipeline_layers(module) if getattr(module, "is_pipeline", False) else {},
             "optimizer": optimizer_order(engine, state) if carry_moments else None}
    gathered = [local]
    if state.world_size > 1:
        gathered = [None] * state.world_size
        dist.all_gather_object(gathered, local)
    tensors, layers, optimizer = {}, {}, {}
    for part in gathered:
        for name, spec in part["tensors"].items():
            tensors.setdefault(name, spec)
        layers.update(part["layers"])
        if part.get("optimizer"):
            optimizer[str(part["optimizer"]["file"])] = part["optimizer"]
    cfg = module.cfg
    spec = {"tensors": dict(sorted(tensors.items())),
            "tied": {"head.output.weight": "embedding.tokens.weight"} if cfg.tie_embeddings else {}}
    result = {"shard_spec": spec,
              "pipeline_layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))) or None,
              "optimizer_layout": dict(sorted(optimizer.items(), key=lambda kv: int(kv[0]))) or None}
    engine._megatron_entropy_spec = result
    return result


def tokenizer_kind(path: str | None) -> str | None:
    if not path:
        return None
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return "sentencepiece"
    return "huggingface"


def _copy_tokenizer(path: str | None, tag_dir: Path) -> str | None:
    """A copy of the training tokenizer inside the checkpoint (export needs it); its name there."""
    kind = tokenizer_kind(path)
    try:
        if kind == "sentencepiece":
            source = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_FILE)
            shutil.copyfile(source, tag_dir / TOKENIZER_FILE)
            return TOKENIZER_FILE
        if kind == "huggingface":
            from megatron_entropy.data.tokenizer import _HF_TOKENIZER_FILES

            (tag_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
            for name in _HF_TOKENIZER_FILES:
                if os.path.isfile(os.path.join(path, name)):
                    shutil.copyfile(os.path.join(path, name), tag_dir / TOKENIZER_DIR / name)
            return TOKENIZER_DIR
    except OSError:
        return None
    return None


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != METADATA_NAME and not p.name.endswith(".tmp")}


def metadata(step: int, sampler, cfg, data, state, engine, zero: int, spec: dict, tokenizer_file) -> dict:
    return {
        "format_version": METADATA_VERSION,
        "kind": "megatron_entropy checkpoint",
        "step": step,
        "config": cfg.to_dict(),
        "layout": {"world_size": state.world_size, "tensor": state.tp_size, "pipeline": state.pp_size,
                   "data": state.dp_size, "zero_stage": zero, "precision": cfg.train.precision},
        "optimizer_state": "full",
        "padded_vocab_size": getattr(engine.module, "padded_vocab", None),
        "true_vocab_size": cfg.model.vocab_size,
        "variant_spec": cfg.model.spec().to_dict(),
        "sampler": sampler.state_dict(),
        "consumed_samples": sampler.consumed_samples,
        "data_seed": cfg.data.seed,
        "rng": {"file": RNG_FILE, "world_size": state.world_size},
        "tokenizer": {"path": data.tokenizer_path, "identity": data.tokenizer_identity,
                      "kind": tokenizer_kind(data.tokenizer_path), "file": tokenizer_file},
        **spec,
        "engine": {"global_steps": int(getattr(engine, "global_steps", step)),
                   "global_samples": int(getattr(engine, "global_samples", 0)),
                   "skipped_steps": int(getattr(engine, "skipped_steps", 0))},
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_latest(root: Path) -> str | None:
    latest = Path(root) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


# ----------------------------------------------------------------------------- save

def save(engine, save_dir: str, step: int, sampler, cfg, data, state, say=print) -> Path:
    tag = tag_for(step)
    root = Path(save_dir)
    tag_dir = root / tag
    if read_latest(root) == tag and (tag_dir / METADATA_NAME).is_file():
        say(f"checkpoint {tag_dir} is already the latest; not writing it again")
        return tag_dir
    if state.rank == 0 and tag_dir.exists():  # left behind by a save that never completed
        shutil.rmtree(tag_dir, ignore_errors=True)
    zero = int(engine.zero_optimization_stage())
    spec = model_spec(engine, state, records_optimizer_order(zero, cfg.train.precision))  # collective
    _barrier(state)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    _write_json_atomic(tag_dir / RNG_FILE.format(rank=state.rank), rng_state())
    _barrier(state)  # every rank's files are on disk before the metadata and `latest`
    if state.rank == 0:
        tokenizer_file = _copy_tokenizer(data.tokenizer_path, tag_dir)
        meta = metadata(step, sampler, cfg, data, state, engine, zero, spec, tokenizer_file)
        meta["files"] = _file_sizes(tag_dir)
        _write_json_atomic(tag_dir / METADATA_NAME, meta)
        _pause_for_tests(step)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        prune(root, cfg.train.keep_last, keep=tag)
        say(f"saved checkpoint {tag_dir}")
    _barrier(state)
    return tag_dir


def _pause_for_tests(step: int) -> None:
    hook = os.environ.get(PAUSE_ENV, "")
    if ":" in hook and hook.split(":", 1)[0] == str(step):
        Path(hook.split(":", 1)[1]).write_text(str(os.getpid()))
        time.sleep(3600)


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep` or `latest`'s)."""
    if keep_last <= 0:
        return
    protected = {keep, read_latest(root)}
    tags = sorted(p.name for p in root.glob("step_*") if (p / METADATA_NAME).is_file())
    for old in tags[:-keep_last]:
        if old not in protected:
            shutil.rmtree(root / old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def read_metadata(checkpoint_dir) -> dict:
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / METADATA_NAME
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not exist; pass a checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a complete megatron_entropy checkpoint (no {METADATA_NAME}); "
                              "pass a directory written by train.py")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not JSON); use an earlier checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{path} is not megatron_entropy checkpoint metadata; pass a directory written by train.py")
    if meta["format_version"] > METADATA_VERSION:
        raise CheckpointError(f"{path} has metadata version {meta['format_version']} but this "
                              f"megatron_entropy reads up to {METADATA_VERSION}; upgrade megatron_entropy")
    for key in ("config", "layout", "step"):
        if key not in meta:
            raise CheckpointError(f"{path} lacks '{key}'; it is not a megatron_entropy checkpoint")
    return meta


def verify_files(checkpoint_dir, meta: dict) -> None:
    """Every file the metadata lists exists with its recorded size (catches truncation early)."""
    for name, size in (meta.get("files") or {}).items():
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {checkpoint_dir} is truncated or altered: {name} has "
                                  f"{path.stat().st_size} bytes, the metadata says {size}; use an earlier checkpoint")


def open_checkpoint(path) -> tuple[Path, dict]:
    """A checkpoint tag directory (or a save dir / run dir holding `latest`) -> (tag dir, verified metadata)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        tag = read_latest(candidate)
        if tag is not None and not (candidate / METADATA_NAME).is_file():
            path = candidate / tag
            if not path.is_dir():
                raise CheckpointError(f"{candidate / LATEST} names {tag}, which does not exist")
            break
    meta = read_metadata(path)
    verify_files(path, meta)
    return path, meta


def resolve(save_dir: str, resume: str) -> Path | None:
    """'auto' -> <save_dir>/latest's tag (None if there is none yet); a path -> that checkpoint."""
    if resume == "auto":
        if not save_dir:
            raise CheckpointError("train.resume=auto needs a save directory; set train.save_dir")
        tag = read_latest(Path(save_dir))
        if tag is None:
            return None
        path = Path(save_dir) / tag
        if not path.is_dir():
            raise CheckpointError(f"{Path(save_dir) / LATEST} names {tag}, which does not exist")
        return path
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint {resume} does not exist; pass a checkpoint directory or 'auto'")
    return path


def config_of(meta: dict):
    from megatron_entropy.config import ConfigError, config_from_dict

    try:
        return config_from_dict(meta["config"])
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's config does not parse here ({e}); "
                              "use the megatron_entropy version that wrote it") from None


SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "seq_length", "ffn_hidden", "vocab_size", "tie_embeddings",
              "qk_bias", "temperature_param")


def check_compatible(meta: dict, cfg, tokenizer_identity: str | None) -> None:
    saved = config_of(meta).model
    for key in SHAPE_KEYS:
        mine, theirs = getattr(cfg.model, key), getattr(saved, key)
        if mine != theirs:
            flag = "ffn_hidden_size" if key == "ffn_hidden" else key
            raise CheckpointError(f"the checkpoint has model.{flag}={theirs} but this run has {mine}; "
                                  f"pass --model.{flag} {theirs} to resume it")
    if saved.spec() != cfg.model.spec():
        raise CheckpointError(f"the checkpoint is a {saved.variant} model ({saved.spec().to_dict()}) but this run "
                              f"builds {cfg.model.variant} ({cfg.model.spec().to_dict()}); pass --model.variant "
                              f"{saved.variant!r} and the same switches")
    theirs = (meta.get("tokenizer") or {}).get("identity")
    if theirs and tokenizer_identity and theirs != tokenizer_identity:
        raise CheckpointError(f"the checkpoint was trained with tokenizer {theirs[:12]}… but this run uses "
                              f"{tokenizer_identity[:12]}…; resume with the same data.tokenizer")


def layout_name(layout: dict) -> str:
    return (f"TP{layout['tensor']} x PP{layout['pipeline']} x DP{layout.get('data', 1)}, "
            f"ZeRO-{layout.get('zero_stage', 0)}")


# ----------------------------------------------------------------------------- resume

@dataclass
class ResumePlan:
    path: Path
    meta: dict
    native: bool  # DeepSpeed loads everything; else weights (and Adam moments) through the shard spec
    reason: str = ""
    carry_moments: bool = False  # this run's optimizer can take Adam moments (moments.target_takes_moments)
    keep_fp32: bool = False  # a 16-bit run: keep the fp32 weights for its optimizer's master copies
    fp32_weights: dict | None = None  # this rank's fp32 tensors (canonical names), between the two steps

    @property
    def converted(self) -> bool:
        return not self.native

    def prepare_model(self, model) -> None:
        """Before deepspeed.initialize: copy the weights in when DeepSpeed cannot load them itself."""
        if self.native:
            return
        from megatron_entropy.training import reshard

        state = model.state
        tensors = reshard.load_into_model(model, reshard.CheckpointReader(self.path, self.meta), state.tp_size,
                                          state.tp_rank, padded_vocab=model.padded_vocab)
        # A bf16/fp16 run builds its fp32 master weights from the 16-bit copies DeepSpeed makes of these;
        # keep the checkpoint's fp32 values to put into the masters once the engine exists (resume()).
        self.fp32_weights = tensors if self.keep_fp32 else None


def plan_resume(save_dir: str, resume_from: str, cfg, state, zero: int, tokenizer_identity, say=print):
    """Find, verify and classify the checkpoint to resume from (before the model is built)."""
    path = resolve(save_dir, resume_from)
    if path is None:
        say(f"no checkpoint in {save_dir} yet; starting from scratch")
        return None
    path, meta = open_checkpoint(path)
    check_compatible(meta, cfg, tokenizer_identity)
    src = meta["layout"]
    mine = {"tensor": state.tp_size, "pipeline": state.pp_size, "data": state.dp_size, "zero_stage": zero}
    same_model_layout = src["tensor"] == mine["tensor"] and src["pipeline"] == mine["pipeline"]
    src_zero = int(src.get("zero_stage", 0))
    optimizer_fits = (src_zero == zero == 0) or (src_zero == zero and src.get("data") == mine["data"])
    if meta.get("optimizer_state", "full") == "moments":
        reason = "a resharded checkpoint: weights and Adam moments, no DeepSpeed optimizer files"
    elif meta.get("optimizer_state", "full") != "full":
        reason = "the checkpoint holds weights only"
    elif not same_model_layout:
        reason = f"it was saved under {layout_name(src)} and this run is {layout_name(mine)}"
    elif not optimizer_fits:
        reason = (f"DeepSpeed's optimizer partitions of {layout_name(src)} do not fit {layout_name(mine)}")
    else:
        return ResumePlan(path, meta, native=True)
    if "shard_spec" not in meta or "tensors" not in meta.get("shard_spec", {}):
        raise CheckpointError(f"{path} was saved under {layout_name(src)} without a shard spec (an older format); "
                              "resume it with that exact layout")
    from megatron_entropy.training.moments import target_takes_moments

    return ResumePlan(path, meta, native=False, reason=reason,
                      carry_moments=target_takes_moments(zero, cfg.train.precision),
                      keep_fp32=cfg.train.precision != "fp32")


def resume(engine, sampler, plan: ResumePlan, state, say=print) -> int:
    """Load what the plan says; restore schedule, counters, data order and RNG; return the step."""
    from megatron_entropy.training import reshard

    path, meta = plan.path, plan.meta
    if plan.native:
        engine.checkpoint_engine = reshard.safe_checkpoint_engine()
        try:
            with reshard.weights_only_torch_load():
                loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as e:
            raise CheckpointError(f"DeepSpeed could not load {path} ({type(e).__name__}: "
                                  f"{reshard._first_line(str(e))})") from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path}; is it complete?")
    else:
        counters = reshard.CheckpointReader(path, meta).engine_state()
        scheduler = getattr(engine, "lr_scheduler", None)
        if scheduler is not None and counters.get("lr_scheduler"):
            scheduler.load_state_dict(counters["lr_scheduler"])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if counters.get(key) is not None:
                setattr(engine, key, int(counters[key]))
        from megatron_entropy.training import moments

        placed = moments.load_into_engine(engine, reshard.CheckpointReader(path, meta), state) \
            if plan.carry_moments else 0
        if placed:
            say(f"resuming through the shard spec ({plan.reason}): weights, Adam moments ({placed} tensors), "
                "LR schedule, step counter and data position are restored")
        else:
            say(f"resuming weights only ({plan.reason}): the LR schedule, step counter and data position are "
                "restored; the optimizer state (Adam moments) is re-initialised"
                + ("" if plan.carry_moments else " (moments move into ZeRO-0 fp32 and ZeRO-1/2 runs only)"))
        if plan.fp32_weights is not None:
            masters = moments.place_fp32_masters(engine, plan.fp32_weights)
            plan.fp32_weights = None
            if masters:
                say(f"the fp32 master weights ({masters} tensors) are the checkpoint's fp32 values, not "
                    "their 16-bit copies")
    if meta.get("sampler"):
        sampler.load_state_dict(meta["sampler"])
    else:
        say("the checkpoint has no data position (imported weights); the data order starts from the beginning")
    rng_file = path / RNG_FILE.format(rank=state.rank)
    if plan.native and meta.get("rng", {}).get("world_size") == state.world_size and rng_file.is_file():
        try:
            set_rng_state(json.loads(rng_file.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{rng_file} is corrupt ({e}); use an earlier checkpoint") from None
    elif plan.native:
        say("RNG states not restored (saved by a different number of ranks)")
    say(f"resumed from {path} (step {meta['step']}, {sampler.consumed_samples} samples consumed)")
    return int(meta["step"])
