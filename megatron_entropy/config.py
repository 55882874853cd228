"""Typed configuration: dataclasses, YAML presets, dotted command-line overrides, validation.

A run is configured by one preset (`configs/<name>.yaml`, default `tiny`) plus dotted overrides
such as `--model.num_layers 4 --train.max_steps 50`. `Config.validate()` rejects impossible
settings with one line naming the key and the fix; `train.py` turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_entropy.model.variants import SPEC_FIELDS, VARIANTS, BlockSpec, resolve_spec

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


@dataclass
class ModelConfig:
    variant: str = "EReg(SM(t)+ScFuFFN)"  # a name from model/variants.py
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    seq_length: int = 128
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size (two-layer FFN only)
    vocab_size: int | None = None  # None: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128  # padded to a multiple of this x tensor-parallel size
    # Switches; None means "as the variant says". Setting one overrides the variant.
    norm: str | None = None
    activation: str | None = None
    ffn_kind: str | None = None
    ffn_stabilizer: str | None = None
    stabilizer_placement: str | None = None
    final_norm: bool | None = None
    learnable_temperature: bool | None = None
    entropy_reg: bool | None = None
    # Initial values and coefficients (paper.md sections 2-3, ambiguities A1, A5, A6).
    temperature_init: float = 1e-2  # CodeParrot 1e-2, Languini 1e-1
    temperature_param: str = "log"  # log: learn log t (t > 0 always) | raw: learn t, clamped >= 1e-4
    alpha_init: float = 1.0
    beta_init: float = 1.0
    entropy_reg_coeff: float = 1e-5  # lambda
    entropy_tolerance: float = 0.2  # gamma
    entropy_threshold_init: float = 0.5  # theta
    entropy_reduction: str = "token_mean"  # | paper_sum (the official code's) | paper_text (mean over queries, then one penalty per head)
    entropy_reference_tokens: int = 16384  # paper micro-batch: 128 sequences x 128 tokens
    qk_bias: bool = True  # the authors' harness has Q/K biases, none on V, O and the FFN
    init_std: float = 0.02
    embedding_dropout: float = 0.0
    attention_core: str = "auto"  # auto | eager | fused | sdpa
    tie_embeddings: bool = True

    def spec(self) -> BlockSpec:
        return resolve_spec(self.variant, {k: getattr(self, k) for k in SPEC_FIELDS})

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    pipeline_partition: str = "parameters"  # DeepSpeed partition method: parameters | uniform
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    train_data: list[str] = field(default_factory=list)  # shard prefixes; empty: embedded corpus
    train_weights: list[float] = field(default_factory=list)  # one per train_data prefix: a blend; empty: concatenate
    valid_data: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # .model file or HF dir; None: trained on the embedded corpus
    tokenizer_vocab_size: int = 4096  # for the embedded corpus' tokenizer
    corpus_max_bytes: int = 4_000_000  # how much of the embedded corpus to use
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/megatron_entropy
    seed: int = 1234  # data order
    # Document-aware samples (docs/data.md): cross | within (attention masked at document
    # boundaries, positions restarted, as Megatron's --reset-attention-mask --reset-position-ids)
    document_attention: str = "cross"
    packing: str = "stream"  # stream (one token stream) | per_document (each document alone, remainder dropped)
    eod_mask_loss: bool = False  # no loss on the label that begins the next document (Megatron's --eod-mask-loss)


@dataclass
class TrainConfig:
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward; accumulation = global / (micro x DP)
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-5
    warmup_steps: int = 30
    lr_decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 1337
    eval_interval: int = 100  # 0: only at the end
    eval_iters: int = 8  # validation micro-batches per evaluation; 0: the whole split
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    save_dir: str | None = None  # None: <run_dir>/checkpoints; "" disables checkpoints
    keep_last: int = 2  # checkpoints kept in save_dir (0: all)
    resume: str = ""  # "" start fresh | auto: continue from <save_dir>/latest if any | a checkpoint path
    exit_duration_minutes: float = 0.0  # save and exit 0 once the process has run this long; 0: no limit
    requeue: bool = True  # on SIGUSR1/SIGTERM under Slurm: save, then `scontrol requeue` the job (rank 0)
    nonfinite: str = "skip"  # non-finite loss/grad on any rank: skip the update on every rank | stop (exit 3)
    inject_nan_at: str = ""  # testing hook "STEP:RANK": make that rank's loss NaN at that step
    # Downstream evaluation with lm-eval during training (docs/evaluation.md; needs the eval extra):
    # shipped task names or the tag megatron_entropy, run on rank 0 every eval_harness_interval
    # steps (0: only at the end) on the first eval_harness_limit documents of each task (0: all).
    eval_harness_tasks: list[str] = field(default_factory=list)
    eval_harness_interval: int = 0
    eval_harness_limit: int = 0


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between metrics lines (and entropy statistics)
    run_dir: str | None = None  # None: runs/<variant>-<time>
    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | off
    wandb_project: str = "megatron_entropy"
    progress_bar: bool = True
    figures: bool = True  # entropy figures (PNG) in the run directory at the end
    collapse_fraction: float = 0.1  # alarm: a layer's mean entropy below this x log T
    overload_share: float = 0.5  # alarm: share of heads in the top entropy bin above this
    spike_factor: float = 1.5  # warn when a logged loss > this x the median of the last 20; 0: off
    # Peak dense TFLOP/s of ONE device in the training dtype (e.g. 989 for H100 SXM bf16): with it,
    # train records get `tflops` (achieved model TFLOP/s per device) and `mfu` (= tflops / peak),
    # counting the variant's model FLOPs (analysis/flops.py). None: neither is logged.
    peak_tflops: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def grad_accumulation_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.data_parallel_size(world_size)
        )

    def validate(self, world_size: int = 1) -> "Config":
        """Raise ConfigError (one line: the key and the fix) for impossible settings."""
        m, p, t, lg = self.model, self.parallel, self.train, self.logging
        try:
            m.spec()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(m.num_layers >= 1, "model.num_layers must be >= 1")
        _check(m.num_heads >= 1 and m.hidden_size >= 1, "model.num_heads and model.hidden_size must be >= 1")
        _check(
            m.hidden_size % m.num_heads == 0,
            f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}; "
            "pick a head count that divides the hidden size",
        )
        _check(m.seq_length >= 2, "model.seq_length must be >= 2")
        _check(m.entropy_reg_coeff >= 0, f"model.entropy_reg_coeff={m.entropy_reg_coeff} must be >= 0 (it is the penalty weight lambda)")
        _check(m.entropy_tolerance >= 0, f"model.entropy_tolerance={m.entropy_tolerance} must be >= 0 (gamma)")
        _check(m.temperature_init > 0, f"model.temperature_init={m.temperature_init} must be > 0")
        _check(m.temperature_param in ("log", "raw"), f"model.temperature_param={m.temperature_param!r} must be log or raw")
        _check(m.alpha_init != 0, "model.alpha_init must be non-zero (the FFN output is divided by alpha)")
        _check(m.entropy_reduction in ("token_mean", "paper_sum", "paper_text"), f"model.entropy_reduction={m.entropy_reduction!r} must be token_mean, paper_sum or paper_text")
        _check(m.attention_core in ("auto", "eager", "fused", "sdpa"), f"model.attention_core={m.attention_core!r} must be auto, eager, fused or sdpa")
        _check(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size must be >= 2 (or unset to take the tokenizer's)")
        _check(0 <= m.embedding_dropout < 1, "model.embedding_dropout must be in [0, 1)")
        _check(p.tensor >= 1 and p.pipeline >= 1, "parallel.tensor and parallel.pipeline must be >= 1")
        _check(
            m.num_heads % p.tensor == 0,
            f"parallel.tensor={p.tensor} does not divide model.num_heads={m.num_heads}; "
            "choose a tensor-parallel size that divides the head count",
        )
        _check(
            p.tensor * p.pipeline <= world_size,
            f"parallel.tensor x parallel.pipeline = {p.tensor * p.pipeline} exceeds the world size {world_size}; "
            "launch more processes or lower the parallel sizes",
        )
        _check(
            world_size % (p.tensor * p.pipeline) == 0,
            f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = "
            f"{p.tensor * p.pipeline}; launch a multiple of that many processes",
        )
        _check(p.pipeline <= m.num_layers, f"parallel.pipeline={p.pipeline} exceeds model.num_layers={m.num_layers}")
        _check(p.pipeline_partition in ("parameters", "uniform"), "parallel.pipeline_partition must be parameters or uniform")
        dp = self.data_parallel_size(world_size)
        _check(t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        _check(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; "
            "adjust one of them",
        )
        _check(t.max_steps >= 1, "train.max_steps must be >= 1")
        _check(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.lr must be > 0 and 0 <= train.min_lr <= train.lr")
        _check(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(t.lr_decay in ("cosine", "linear", "constant"), f"train.lr_decay={t.lr_decay!r} must be cosine, linear or constant")
        _check(t.precision in ("fp32", "bf16", "fp16"), f"train.precision={t.precision!r} must be fp32, bf16 or fp16")
        _check(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip and train.weight_decay must be >= 0")
        _check(lg.log_interval >= 1, "logging.log_interval must be >= 1")
        _check(t.exit_duration_minutes >= 0, "train.exit_duration_minutes must be >= 0 (0: no limit)")
        _check(t.nonfinite in ("skip", "stop"), f"train.nonfinite={t.nonfinite!r} must be skip or stop")
        _check(not t.inject_nan_at or _INJECT.match(t.inject_nan_at) is not None,
               f"train.inject_nan_at={t.inject_nan_at!r} must look like STEP:RANK (e.g. 5:1) or be empty")
        _check(lg.spike_factor == 0 or lg.spike_factor > 1, "logging.spike_factor must be > 1 (or 0 to disable)")
        _check(lg.peak_tflops is None or lg.peak_tflops > 0, "logging.peak_tflops must be > 0 (or none to disable)")
        if t.eval_harness_tasks:
            _check_harness(t, p)
        d = self.data
        _check(not d.train_weights or len(d.train_weights) == len(d.train_data),
               f"data.train_weights has {len(d.train_weights)} weights for {len(d.train_data)} data.train_data "
               "prefixes; give one weight per prefix (or none to concatenate them)")
        _check(all(w >= 0 for w in d.train_weights) and (not d.train_weights or sum(d.train_weights) > 0),
               "data.train_weights must be >= 0 with a positive sum")
        _check(d.document_attention in ("cross", "within"),
               f"data.document_attention={d.document_attention!r} must be cross or within")
        _check(d.packing in ("stream", "per_document"), f"data.packing={d.packing!r} must be stream or per_document")
        _check(lg.wandb in ("auto", "online", "offline", "off"), f"logging.wandb={lg.wandb!r} must be auto, online, offline or off")
        return self


_INJECT = re.compile(r"^\s*\d+\s*:\s*\d+\s*$")  # "STEP:RANK" (quote it in YAML files: 5:1 is base-60 there)


def _check_harness(t: TrainConfig, p: ParallelConfig) -> None:
    import importlib.util

    from megatron_entropy.downstream.local_tasks import INSTALL_HINT, TAG, shipped_task_names, unknown_tasks

    unknown = unknown_tasks(t.eval_harness_tasks)
    _check(not unknown, f"train.eval_harness_tasks: unknown task {', '.join(unknown)}; choose from "
                        f"{', '.join(shipped_task_names())} or the tag {TAG}")
    _check(t.eval_harness_interval >= 0 and t.eval_harness_limit >= 0,
           "train.eval_harness_interval and train.eval_harness_limit must be >= 0 (0: at the end / every document)")
    _check(p.tensor == 1 and p.pipeline == 1,
           "train.eval_harness_tasks evaluates the unsharded model on rank 0, so it needs parallel.tensor=1 and "
           "parallel.pipeline=1; evaluate the saved checkpoint with tools/eval_harness.py instead")
    _check(importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("accelerate") is not None,
           f"train.eval_harness_tasks: {INSTALL_HINT}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ----------------------------------------------------------------------------- loading

def _coerce(value, annotation, key: str):
    """Convert a YAML-parsed value to the dataclass field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            value = float(value) if annotation is float else int(value)
        except ValueError:
            pass
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads `off` / `on` as booleans
            return "on" if value else "off"
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def _section_types(section) -> dict:
    return typing.get_type_hints(type(section))


def set_value(cfg: Config, dotted: str, value) -> None:
    """cfg.<section>.<key> = value (coerced), with a one-line error for unknown keys."""
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"unknown config key {dotted!r}; keys look like <section>.<name> with section one of "
            f"{', '.join(sorted(sections))} (see docs/configuration.md)"
        )
    section = getattr(cfg, parts[0])
    hints = _section_types(section)
    if parts[1] not in hints:
        close = [k for k in hints if k.startswith(parts[1][:4])]
        hint = f" (did you mean {parts[0]}.{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {dotted!r}{hint}; see docs/configuration.md for every key")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))


def _apply_mapping(cfg: Config, mapping: dict, source: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model:, train:, ...)")
    for section, values in mapping.items():
        if section == "base":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist; pass a preset name or an existing YAML file")
        return path
    path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(names)} or pass a .yaml path")
    return path


def load_preset(name_or_path: str, cfg: Config | None = None, _depth: int = 0) -> Config:
    """Load a YAML preset; a preset may name another with `base: <name>` and override it."""
    cfg = cfg or Config()
    path = preset_path(name_or_path)
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if "base" in mapping:
        if _depth > 4:
            raise ConfigError(f"{path}: preset 'base' chain is too deep")
        load_preset(mapping["base"], cfg, _depth + 1)
    _apply_mapping(cfg, mapping, str(path))
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--model.num_layers', '4', '--train.lr=1e-3'] -> [('model.num_layers', '4'), ...] (raw strings)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 4")
            raw = args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"unknown option --{key}; config keys look like --section.key (see train.py --help)")
        pairs.append((key, raw))
    return pairs


def _is_str_field(annotation) -> bool:
    """str or str | None (not list[str])."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)] == [str]
    return annotation is str


def parse_cli_value(cfg: Config, dotted: str, raw: str):
    """A command-line string as the key's type: string keys keep it verbatim (so 5:1 or 1e-4 stay
    text), other keys are read as YAML (true, 1e-4, [a, b]); `none` is None for every key."""
    if raw.lower() == "none":
        return None
    section = getattr(cfg, dotted.split(".")[0], None)
    annotation = _section_types(section).get(dotted.split(".")[-1]) if section is not None else None
    if annotation is not None and _is_str_field(annotation):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return raw[1:-1] if quoted else raw  # --x "''" (quotes that reached us) means the empty string
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def build_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    cfg = load_preset(preset)
    for key, raw in parse_overrides(overrides or []):
        set_value(cfg, key, parse_cli_value(cfg, key, raw))
    return cfg


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_entropy")


def config_from_dict(mapping: dict) -> Config:
    """Rebuild a Config from Config.to_dict() output (checkpoint metadata)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, "config")
    return cfg


def describe_keys() -> list[tuple[str, str, object]]:
    """(key, type, default) for every config key; used by docs and --help."""
    rows = []
    for section_field in dataclasses.fields(Config):
        section = section_field.default_factory()
        hints = _section_types(section)
        for f in dataclasses.fields(section):
            hint = hints[f.name]
            name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            rows.append((f"{section_field.name}.{f.name}", name, getattr(section, f.name)))
    return rows


__all__ = [
    "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "TrainConfig", "VARIANTS", "build_config", "config_from_dict", "load_preset", "set_value",
]
