"""Full state dicts from checkpoints of any layout, and back again (checkpoint resharding).

Our metadata (`megatron_entropy.json`, training/checkpoint.py) carries a *shard spec*: for every
tensor of the model, under its canonical name (the single-process GPTModel's), its global shape,
the dimension it is split along over tensor parallelism (None: replicated), and whether its first
dimension is the padded vocabulary. With it a checkpoint written under any TP x PP x DP x ZeRO
layout gathers into one full, unpadded state dict, and that scatters into any other layout:

    gather   TP shards are concatenated along their partition dim; vocabulary rows past the true
             vocabulary (padding, a function of TP) are dropped
    scatter  vocabulary rows are padded with zeros to the target's padded size, then split

Where the tensors are read from:
    PP > 1         DeepSpeed's per-layer files  layer_XX-model_TT-model_states.pt  (the metadata's
                   `pipeline_layers` maps layer index XX to the canonical prefix)
    ZeRO-3         the fp32 partitions of every data-parallel rank, through DeepSpeed's zero_to_fp32
                   (one tensor-parallel rank at a time)
    otherwise      mp_rank_TT_model_states.pt  ['module']

Nothing is ever unpickled beyond tensors and plain containers: every file goes through
`safe_load` (torch.load(weights_only=True) plus an allow-list of four DeepSpeed bookkeeping
types), and DeepSpeed's own loader is given `SafeTorchCheckpointEngine`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from megatron_entropy.training.checkpoint import CheckpointError

# Canonical tensors whose first dimension is the (padded) vocabulary.
VOCAB_TENSORS = frozenset({"embedding.tokens.weight", "head.output.weight"})
# Adam moments at full size (tools/reshard_checkpoint.py output), canonical names + "::exp_avg" etc.
MOMENTS_FILE = "optimizer_moments.safetensors"


# ----------------------------------------------------------------------------- safe loading

def safe_globals() -> list:
    """The non-tensor classes DeepSpeed's checkpoint files contain (all plain data holders)."""
    allowed = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            allowed.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
            pass
    return allowed


SAFE_GLOBAL_NAMES = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"})

_original_torch_load = torch.load


def safe_load(path, map_location="cpu", **kwargs):
    """torch.load(weights_only=True) with DeepSpeed's four data classes allowed; one-line errors.

    DeepSpeed is imported only when a file names one of its classes (ZeRO optimizer files), so
    reading model files stays light."""
    path = os.fspath(path)
    kwargs.pop("weights_only", None)
    allowed: list = []
    for _ in range(2):
        try:
            with torch.serialization.safe_globals(allowed):
                return _original_torch_load(path, map_location=map_location, weights_only=True, **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
        except pickle.UnpicklingError as e:
            text = str(e)
            if "Unsupported global" in text or "Weights only load failed" in text:
                culprit = text.split("GLOBAL ", 1)[1].split()[0] if "GLOBAL " in text else "not a tensor"
                if culprit in SAFE_GLOBAL_NAMES and not allowed:
                    allowed = safe_globals()
                    continue
                raise CheckpointError(f"{path} holds a pickled object ({culprit}) that is not a tensor or plain "
                                      "container; refusing to unpickle it (only load checkpoints written by "
                                      "train.py)") from None
            raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(text)}); use an earlier "
                                  "checkpoint") from None
        except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(str(e))}); "
                                  "use an earlier checkpoint") from None
    raise CheckpointError(f"{path}: cannot be read with the allowed types")  # pragma: no cover


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "no detail")[:200]


@contextlib.contextmanager
def weights_only_torch_load():
    """Within the block, every torch.load (DeepSpeed's included) is safe_load."""
    def patched(f, map_location=None, *args, **kwargs):
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)
        return safe_load(f, map_location=map_location or "cpu", **kwargs)

    previous = torch.load
    torch.load = patched
    try:
        yield
    finally:
        torch.load = previous


def safe_checkpoint_engine(config_params=None):
    """DeepSpeed's TorchCheckpointEngine, loading with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location or "cpu")

    engine = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    TorchCheckpointEngine.__init__(engine, config_params)
    return engine


# ----------------------------------------------------------------------------- names and specs

def canonical(name: str) -> str:
    """GPTModel state-dict key -> canonical key (the LM head's tied reference is the embedding)."""
    return "embedding." + name[len("head.tied."):] if name.startswith("head.tied.") else name


def _module_prefixes(model: nn.Module) -> dict[str, str]:
    """Module path in `model` -> canonical prefix, for the pieces our models are built from."""
    from megatron_entropy.model.block import DecoderLayer
    from megatron_entropy.model.gpt import Embedding, LMHead

    prefixes = {}
    for name, module in model.named_modules():
        if isinstance(module, Embedding):
            prefixes[name] = "embedding"
        elif isinstance(module, DecoderLayer):
            prefixes[name] = f"layers.{module.layer_number}"
        elif isinstance(module, LMHead):
            prefixes[name] = "head"
    return prefixes


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every state-dict key of `model` (GPTModel or our PipelineModule) -> its canonical name."""
    if not getattr(model, "is_pipeline", False):
        return {key: canonical(key) for key in model.state_dict()}
    prefixes = sorted(_module_prefixes(model).items(), key=lambda kv: -len(kv[0]))
    names = {}
    for key in model.state_dict():
        for path, prefix in prefixes:
            if key.startswith(path + "."):
                names[key] = canonical(prefix + key[len(path):])
                break
        else:
            raise CheckpointError(f"parameter {key} of the pipeline model has no canonical name")
    return names


def partition_dims(model: nn.Module) -> dict[str, int | None]:
    """state-dict key -> TP partition dim, from the parameters' and modules' annotations."""
    dims = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for p_name, p in module.named_parameters(recurse=False):
            dims[prefix + p_name] = getattr(p, "partition_dim", None)
        for b_name, _ in module.named_buffers(recurse=False):
            dims[prefix + b_name] = getattr(module, "buffer_partition_dims", {}).get(b_name)
    return dims


def local_spec(model: nn.Module, tp_size: int) -> dict[str, dict]:
    """Canonical name -> {shape (global, padded), partition_dim, vocab_padded, dtype, buffer} of
    the tensors this rank holds. Under ZeRO-3 the shapes come from DeepSpeed's ds_shape."""
    names, dims = canonical_names(model), partition_dims(model)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    spec = {}
    for key in model.state_dict(keep_vars=True):
        tensor = tensors.get(key)
        if tensor is None:
            continue
        shape = list(getattr(tensor, "ds_shape", tensor.shape))
        dim = dims.get(key)
        if dim is not None:
            shape[dim] *= tp_size
        spec.setdefault(names[key], {"shape": shape, "partition_dim": dim, "vocab_padded": names[key] in VOCAB_TENSORS,
                                     "dtype": str(tensor.dtype).replace("torch.", ""), "buffer": key not in params})
    return spec


def pipeline_layers(model: nn.Module) -> dict[str, str]:
    """DeepSpeed layer index -> canonical prefix, for the layers this pipeline rank holds."""
    prefixes = {id(m): p for path, p in _module_prefixes(model).items() for m in [model.get_submodule(path)]}
    layers = {}
    for i, func in enumerate(model.forward_funcs):
        if isinstance(func, nn.Module) and id(func) in prefixes:
            layers[str(model._local_start + i)] = prefixes[id(func)]
    return layers


def expected_pipeline_layers(num_layers: int) -> dict[str, str]:
    """The layer list of training/pipeline.py: embedding, decoder layers, head (+ tied projection)."""
    layers = {"0": "embedding"}
    layers.update({str(1 + i): f"layers.{i}" for i in range(num_layers)})
    layers[str(num_layers + 1)] = "head"
    return layers


# ----------------------------------------------------------------------------- gather

class CheckpointReader:
    """Read the tensors of one checkpoint directory (any layout) through its metadata."""

    def __init__(self, path, meta: dict):
        self.path, self.meta = Path(path), meta
        layout = meta["layout"]
        self.tp, self.pp = int(layout["tensor"]), int(layout["pipeline"])
        self.zero_stage = int(layout.get("zero_stage", 0))
        spec = meta.get("shard_spec", {})
        if "tensors" not in spec:
            raise CheckpointError(f"{self.path} has no shard spec (metadata format "
                                  f"{meta.get('format_version')}); it can only be resumed in its own layout")
        self.spec = spec["tensors"]
        self.true_vocab = int(meta["true_vocab_size"])

    # -- raw per-TP-rank tensors, canonical names -----------------------------------------------
    def _tp_shards(self, t: int, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
        if self.pp > 1:
            return self._pipeline_shards(t, wanted)
        if self.fp32_from_zero:
            return {canonical(k): v for k, v in self._zero_shards(t).items()}
        state = safe_load(self.path / f"mp_rank_{t:02d}_model_states.pt")
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{self.path / f'mp_rank_{t:02d}_model_states.pt'} holds no model weights; "
                                  "is this a DeepSpeed checkpoint written by train.py?")
        return {canonical(k): v for k, v in module.items()}

    def _pipeline_shards(self, t: int, wanted) -> dict[str, torch.Tensor]:
        layers = self.meta.get("pipeline_layers") or {}
        if not layers:
            raise CheckpointError(f"{self.path}: pipeline checkpoint without a layer map in its metadata")
        out = {}
        for index, prefix in sorted(layers.items(), key=lambda kv: int(kv[0])):
            if wanted is not None and not any(w.startswith(prefix + ".") for w in wanted):
                continue
            state = safe_load(self.path / f"layer_{int(index):02d}-model_{t:02d}-model_states.pt")
            for key, value in state.items():
                out.setdefault(canonical(f"{prefix}.{key}"), value)
        return out

    @property
    def fp32_from_zero(self) -> bool:
        """Read the weights from the fp32 ZeRO partitions: always under ZeRO-3 (the model files hold
        none), and under ZeRO-1/2 when training was bf16/fp16 (the model files hold 16-bit copies)."""
        precision = self.meta["layout"].get("precision", "fp32")
        return self.pp == 1 and (self.zero_stage == 3 or (self.zero_stage in (1, 2) and precision != "fp32"))

    def _zero_shards(self, t: int) -> dict[str, torch.Tensor]:
        """One TP rank's full (TP-local) fp32 weights from ZeRO partitions (DeepSpeed's zero_to_fp32)."""
        from deepspeed.utils import zero_to_fp32

        suffix = f"_mp_rank_{t:02d}_"
        files = [p for p in self.path.iterdir() if "zero_pp_rank_" in p.name and suffix in p.name]
        if self.zero_stage != 3:
            files.append(self.path / f"mp_rank_{t:02d}_model_states.pt")
        if not any(p.name.endswith("_optim_states.pt") for p in files):
            raise CheckpointError(f"{self.path} has no ZeRO-{self.zero_stage} partitions for tensor-parallel "
                                  f"rank {t}; the checkpoint is incomplete")
        with tempfile.TemporaryDirectory(prefix="me-zero3-") as tmp:
            view = Path(tmp) / "view"
            view.mkdir()
            for p in files:  # zero_to_fp32 globs a whole directory: show it one TP rank's files
                os.symlink(p.resolve(), view / p.name)
            quiet = io.StringIO()
            try:
                with weights_only_torch_load(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp, tag="view")
            except CheckpointError:
                raise
            except Exception as e:  # DeepSpeed raises many kinds for a broken checkpoint
                raise CheckpointError(f"cannot gather the ZeRO-{self.zero_stage} partitions in {self.path} "
                                      f"({type(e).__name__}: {_first_line(str(e))})") from None
        return {k: v.detach().clone() for k, v in state.items()}

    # -- full state -----------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model at full size, vocabulary padding removed."""
        shards = [self._tp_shards(t) for t in range(self.tp)]
        return {name: self._gather(name, [s.get(name) for s in shards]) for name in self.spec}

    def _gather(self, name: str, parts: list) -> torch.Tensor:
        if any(p is None for p in parts):
            raise CheckpointError(f"{self.path} does not hold {name}; the checkpoint is incomplete or was written "
                                  "by a different model")
        spec = self.spec[name]
        dim = spec["partition_dim"]
        full = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if list(full.shape) != list(spec["shape"]):
            raise CheckpointError(f"{self.path}: {name} has shape {list(full.shape)} but the metadata says "
                                  f"{spec['shape']}; the checkpoint is inconsistent")
        if spec["vocab_padded"]:
            full = full[: self.true_vocab]
        return full.contiguous()

    def local_state_dict(self, tp_size: int, tp_rank: int, wanted: set[str] | None = None,
                         padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
        """The canonical tensors one rank of a TP-`tp_size` layout needs, already sharded."""
        if tp_size == self.tp:
            # Same TP: this rank's shards are the source rank's, read only that rank's files.
            shards = self._tp_shards(tp_rank, wanted)
            out = {}
            for name in wanted or self.spec:
                if name not in shards:
                    raise CheckpointError(f"{self.path} does not hold {name}; the checkpoint is incomplete "
                                          "or was written by a different model")
                value = shards[name]
                if self.spec.get(name, {}).get("vocab_padded") and padded_vocab is not None:
                    value = _resize_rows(value[: self._local_true_rows(tp_rank)], padded_vocab // tp_size)
                out[name] = value
            return out
        full = self.full_state_dict()
        return {name: shard_tensor(full[name], self.spec[name], tp_size, tp_rank, padded_vocab)
                for name in (wanted or self.spec)}

    def _local_true_rows(self, tp_rank: int) -> int:
        per_rank = self.spec["embedding.tokens.weight"]["shape"][0] // self.tp
        return max(0, min(per_rank, self.true_vocab - tp_rank * per_rank))

    # -- Adam moments -----------------------------------------------------------------------------
    def full_moments(self) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]] | None:
        """(step, {name: {exp_avg, exp_avg_sq}}) at full size, vocabulary padding removed; None if absent
        or in a layout we do not read (training/moments.py)."""
        from megatron_entropy.training import moments

        return moments.read_full(self)

    # -- training state that does not depend on the layout --------------------------------------
    def engine_state(self) -> dict:
        """lr_scheduler state and DeepSpeed's step counters (from TP/PP rank 0's model file)."""
        name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if self.zero_stage == 3 and self.pp == 1 \
            else "mp_rank_00_model_states.pt"
        state = safe_load(self.path / name)
        keys = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
        return {k: state.get(k) for k in keys if isinstance(state, dict)}


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def shard_tensor(full: torch.Tensor, spec: dict, tp_size: int, tp_rank: int,
                 padded_vocab: int | None) -> torch.Tensor:
    """A rank's shard of a full (unpadded) tensor: pad the vocabulary, then split."""
    if spec.get("vocab_padded") and padded_vocab is not None:
        full = _resize_rows(full, padded_vocab)
    dim = spec.get("partition_dim")
    if dim is None or tp_size == 1:
        return full.clone()
    if full.shape[dim] % tp_size:
        raise CheckpointError(f"dimension {dim} of size {full.shape[dim]} does not split over tensor-parallel "
                              f"size {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


# ----------------------------------------------------------------------------- scatter into a live model

@torch.no_grad()
def load_into_model(model: nn.Module, reader: CheckpointReader, tp_size: int, tp_rank: int,
                    padded_vocab: int) -> dict[str, torch.Tensor]:
    """Copy a checkpoint's weights (any layout) into this rank's shards of `model` (before DeepSpeed);
    returns those shards as read (canonical names, the checkpoint's precision: fp32 for our runs)."""
    names = canonical_names(model)
    own = model.state_dict()
    wanted = {names[k] for k in own}
    tensors = reader.local_state_dict(tp_size, tp_rank, wanted, padded_vocab)
    new = {}
    for key, current in own.items():
        value = tensors[names[key]]
        if tuple(value.shape) != tuple(current.shape):
            raise CheckpointError(f"checkpoint tensor {names[key]} has shape {list(value.shape)} here but this "
                                  f"model expects {list(current.shape)}; the model settings differ")
        new[key] = value.to(dtype=current.dtype)
    model.load_state_dict(new, strict=True)
    return tensors


# ----------------------------------------------------------------------------- write a layout

def write_layout(full: dict[str, torch.Tensor], spec: dict[str, dict], out_dir, tp: int, pp: int, num_layers: int,
                 padded_vocab: int, engine_state: dict, tie_embeddings: bool) -> list[str]:
    """Write `full` as a weights-only DeepSpeed (ZeRO-0 style) checkpoint for TP `tp` x PP `pp`.

    Non-pipeline: mp_rank_TT_model_states.pt with the GPTModel state dict (the tied head's
    `head.tied.*` keys included, as GPTModel.state_dict() has them). Pipeline: one
    layer_XX-model_TT-model_states.pt per layer and TP rank, plus one mp_rank file per
    (stage, TP rank) with the engine state and no module (as DeepSpeed writes them).
    """
    import deepspeed

    out_dir = Path(out_dir)
    written = []

    def sharded(name: str, t: int) -> torch.Tensor:
        return shard_tensor(full[name], spec[name], tp, t, padded_vocab).contiguous()

    common = {
        "buffer_names": [], "optimizer": None, "lr_scheduler": engine_state.get("lr_scheduler"),
        "global_steps": engine_state.get("global_steps", 0), "global_samples": engine_state.get("global_samples", 0),
        "skipped_steps": engine_state.get("skipped_steps", 0), "dp_world_size": 1, "mp_world_size": tp * pp,
        "ds_version": deepspeed.__version__, "param_shapes": None, "frozen_param_shapes": None,
        "shared_params": {}, "frozen_param_fragments": None,
    }
    if pp == 1:
        for t in range(tp):
            module = {name: sharded(name, t) for name in spec}
            if tie_embeddings:
                for name in list(module):
                    if name.startswith("embedding."):
                        module["head.tied." + name[len("embedding."):]] = module[name]
            state = dict(common, module=module, buffer_names=[n for n in spec if spec[n].get("buffer")])
            path = out_dir / f"mp_rank_{t:02d}_model_states.pt"
            torch.save(state, path)
            written.append(path.name)
        return written
    layers = expected_pipeline_layers(num_layers)
    for index, prefix in layers.items():
        for t in range(tp):
            layer_state = {name[len(prefix) + 1:]: sharded(name, t) for name in spec if name.startswith(prefix + ".")}
            path = out_dir / f"layer_{int(index):02d}-model_{t:02d}-model_states.pt"
            torch.save(layer_state, path)
            written.append(path.name)
    for rank in range(tp * pp):
        path = out_dir / f"mp_rank_{rank:02d}_model_states.pt"
        torch.save(dict(common, module=None), path)
        written.append(path.name)
    return written


# ----------------------------------------------------------------------------- the whole conversion

def check_layout(cfg, tensor: int, pipeline: int) -> None:
    """A one-line CheckpointError when TP x PP does not divide the model."""
    m = cfg.model
    if tensor < 1 or pipeline < 1:
        raise CheckpointError(f"--tensor {tensor} --pipeline {pipeline}: both must be >= 1")
    if m.num_heads % tensor:
        raise CheckpointError(f"tensor-parallel size {tensor} does not divide the model's {m.num_heads} heads; "
                              "choose a divisor of the head count")
    ffn = m.ffn_hidden if m.spec().ffn_kind == "two_layer" else m.hidden_size
    if ffn % tensor or m.hidden_size % tensor:
        raise CheckpointError(f"tensor-parallel size {tensor} does not divide the hidden size {m.hidden_size} "
                              f"or FFN size {ffn}")
    if pipeline > m.num_layers:
        raise CheckpointError(f"pipeline size {pipeline} exceeds the model's {m.num_layers} layers")


def reshard_checkpoint(src, dst, tensor: int, pipeline: int, say=print) -> Path:
    """Write checkpoint `src` (any layout, any ZeRO stage) as a weights-only checkpoint for TP x PP in `dst`.

    `dst` becomes a save directory (`latest` + one tag directory) that train.py resumes with
    `--train.resume DST --parallel.tensor N --parallel.pipeline M`. Nothing is written to `dst`
    unless the whole conversion succeeds (a temporary sibling directory is renamed at the end).
    """
    import json
    import shutil

    import megatron_entropy
    from megatron_entropy.model.gpt import padded_vocab_size
    from megatron_entropy.training import checkpoint as ckpt

    path, meta = ckpt.open_checkpoint(src)
    cfg = ckpt.config_of(meta)
    check_layout(cfg, tensor, pipeline)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists and is not empty; pass a new directory")
    reader = CheckpointReader(path, meta)
    say(f"reading {path} ({ckpt.layout_name(meta['layout'])})")
    full = reader.full_state_dict()
    engine_state = reader.engine_state()
    padded = padded_vocab_size(reader.true_vocab, cfg.model.make_vocab_size_divisible_by, tensor)
    spec = {}
    for name, entry in reader.spec.items():
        entry = dict(entry)
        if entry["vocab_padded"]:
            entry["shape"] = [padded] + list(entry["shape"][1:])
        spec[name] = entry
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tag_dir = tmp / path.name
    tag_dir.mkdir(parents=True)
    try:
        write_layout(full, spec, tag_dir, tensor, pipeline, cfg.model.num_layers, padded, engine_state,
                     cfg.model.tie_embeddings)
        moments = reader.full_moments()
        if moments is not None:
            from safetensors.torch import save_file

            step, by_name = moments
            flat = {f"{name}::{kind}": t.contiguous() for name, entry in by_name.items() for kind, t in entry.items()}
            flat["__step__"] = step.reshape(()).float()
            save_file(flat, str(tag_dir / MOMENTS_FILE))
        tokenizer = meta.get("tokenizer") or {}
        if tokenizer.get("file") and (path / tokenizer["file"]).exists():
            source = path / tokenizer["file"]
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, tag_dir / tokenizer["file"])
        new = dict(meta)
        new["config"] = json.loads(json.dumps(meta["config"]))
        new["config"]["parallel"].update(tensor=tensor, pipeline=pipeline)
        new["layout"] = {"world_size": tensor * pipeline, "tensor": tensor, "pipeline": pipeline, "data": 1,
                         "zero_stage": 0, "precision": meta["layout"].get("precision", "fp32")}
        new["optimizer_state"] = "moments" if moments is not None else "none"
        new["optimizer_layout"] = None
        new["padded_vocab_size"] = padded
        new["shard_spec"] = dict(meta["shard_spec"], tensors=spec)
        new["pipeline_layers"] = expected_pipeline_layers(cfg.model.num_layers) if pipeline > 1 else None
        new["rng"] = None
        new["resharded_from"] = {"path": str(path), "layout": meta["layout"],
                                 "megatron_entropy": megatron_entropy.__version__}
        new["files"] = ckpt._file_sizes(tag_dir)
        (tag_dir / ckpt.METADATA_NAME).write_text(json.dumps(new, indent=1))
        (tmp / ckpt.LATEST).write_text(path.name)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if moments is not None:
        carried = ("weights and Adam moments (a run resumed from it under ZeRO-0 in fp32, or ZeRO-1/2, "
                   "continues with them; ZeRO-3 and ZeRO-0 in bf16 re-initialise the optimizer)")
    else:
        carried = ("weights only: the source's optimizer state is not in a form we read (ZeRO-3, ZeRO-1 with "
                   "pipeline parallelism, or no optimizer step yet), so a run resumed from it re-initialises "
                   "the optimizer")
    say(f"wrote {dst / path.name} (TP{tensor} x PP{pipeline}; {carried}; the LR schedule, step counter and data "
        "position are carried)")
    return dst / path.name


__all__ = ["CheckpointReader", "canonical", "canonical_names", "load_into_model", "local_spec", "safe_load",
           "reshard_checkpoint", "safe_checkpoint_engine", "shard_tensor", "weights_only_torch_load", "write_layout"]
