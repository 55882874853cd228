"""Export a megatron_entropy checkpoint to a Hugging Face directory, and import a GPT-2 one.

    export_checkpoint(CKPT, OUT, fold=False)   any TP/PP/DP layout and ZeRO stage (training/reshard.py)
    import_gpt2(HF_DIR, OUT)                    a GPT2LMHeadModel directory -> an SM+LN+G checkpoint

What OUT holds: model.safetensors + config.json (+ the modeling/configuration .py files for our own
class), tokenizer.model + tokenizer_config.json (+ tokenization_megatron_entropy.py), and
generation_config.json. The padded vocabulary is stripped; training-only tensors (entropy
thresholds theta, spectral-norm bookkeeping) are dropped.

  * SM+LN+G (LayerNorm, GELU, two-layer FFN, final norm, tied embeddings) becomes a native
    `GPT2LMHeadModel` (no remote code): Q/K/V are stacked into c_attn, weights transposed for GPT-2's
    Conv1D, absent biases (V, O, FFN; Q/K when model.qk_bias is off) are zeros.
  * every other variant becomes `MegatronEntropyForCausalLM` (hf/modeling_megatron_entropy.py, loaded
    with trust_remote_code=True), the same computation as GPTModel at one process.
  * fold=True folds the inference-time constants into plain weights: weight/spectral normalisation
    (W_eff), 1/alpha (into the FFN output), beta (a per-layer rescaling of the residual stream
    absorbed by Q/K/V/O and the FFN when no LayerNorm follows; the LM head becomes untied), and
    1/(t sqrt(d_k)) as a per-head, per-position query scale buffer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from megatron_entropy.training.checkpoint import CheckpointError

BASELINE_SPEC = dict(norm="layernorm", activation="gelu", ffn_kind="two_layer", ffn_stabilizer="none",
                     final_norm=True, learnable_temperature=False)
TRAINING_ONLY = (".attention.theta", ".spectral_ready")


# ----------------------------------------------------------------------------- reading our checkpoints

def load_full(ckpt) -> tuple[Path, dict, object, dict]:
    """(tag dir, metadata, Config, full fp32 state dict with canonical names) of a checkpoint."""
    from megatron_entropy.training import checkpoint, reshard

    path, meta = checkpoint.open_checkpoint(ckpt)
    cfg = checkpoint.config_of(meta)
    cfg.model.vocab_size = int(meta["true_vocab_size"])
    full = reshard.CheckpointReader(path, meta).full_state_dict()
    full = {k: (v.float() if v.is_floating_point() else v) for k, v in full.items()}
    return path, meta, cfg, full


def is_gpt2(model_cfg) -> bool:
    spec = model_cfg.spec()
    return all(getattr(spec, k) == v for k, v in BASELINE_SPEC.items()) and model_cfg.tie_embeddings


def special_ids(tokenizer_path) -> dict:
    """bos / eos / pad ids of a SentencePiece model (None where it has none)."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer_path is None or not Path(tokenizer_path).is_file():
        return ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(tokenizer_path))
    for key, value in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id())):
        ids[key] = int(value) if value >= 0 else None
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


# ----------------------------------------------------------------------------- GPT-2

def gpt2_config(model_cfg, ids: dict):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.seq_length, n_embd=model_cfg.hidden_size,
                      n_layer=model_cfg.num_layers, n_head=model_cfg.num_heads, n_inner=model_cfg.ffn_hidden,
                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=1e-5, scale_attn_weights=True, tie_word_embeddings=True,
                      **{k: v for k, v in ids.items() if v is not None})


def to_gpt2_state(full: dict, model_cfg) -> dict:
    """Canonical tensors -> GPT2LMHeadModel state dict (Conv1D weights are [in, out])."""
    d, sd = model_cfg.hidden_size, {}
    sd["transformer.wte.weight"] = full["embedding.tokens.weight"]
    sd["transformer.wpe.weight"] = full["embedding.positions"]
    zeros = torch.zeros
    for i in range(model_cfg.num_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[dst + theirs + ".weight"] = full[src + ours + ".weight"]
            sd[dst + theirs + ".bias"] = full[src + ours + ".bias"]
        att = src + "attention."
        weights = [full[att + n + ".weight"] for n in ("q", "k", "v")]
        biases = [full.get(att + n + ".bias", zeros(d)) for n in ("q", "k")] + [zeros(d)]
        sd[dst + "attn.c_attn.weight"] = torch.cat(weights, dim=0).t().contiguous()
        sd[dst + "attn.c_attn.bias"] = torch.cat(biases)
        sd[dst + "attn.c_proj.weight"] = full[att + "o.weight"].t().contiguous()
        sd[dst + "attn.c_proj.bias"] = zeros(d)
        sd[dst + "mlp.c_fc.weight"] = full[src + "ffn.fc_in.weight"].t().contiguous()
        sd[dst + "mlp.c_fc.bias"] = zeros(model_cfg.ffn_hidden)
        sd[dst + "mlp.c_proj.weight"] = full[src + "ffn.fc_out.weight"].t().contiguous()
        sd[dst + "mlp.c_proj.bias"] = zeros(d)
    sd["transformer.ln_f.weight"] = full["head.final_norm.weight"]
    sd["transformer.ln_f.bias"] = full["head.final_norm.bias"]
    sd["lm_head.weight"] = full["embedding.tokens.weight"]
    return sd


def from_gpt2_state(sd: dict, hf_cfg, say=print) -> dict:
    """GPT2LMHeadModel state dict -> canonical tensors of an SM+LN+G GPTModel (no V/O/FFN biases)."""
    d, full, dropped = hf_cfg.n_embd, {}, []
    get = lambda key: sd[key].float()  # noqa: E731
    full["embedding.tokens.weight"] = get("transformer.wte.weight")
    full["embedding.positions"] = get("transformer.wpe.weight")
    for i in range(hf_cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            full[dst + ours + ".weight"] = get(src + theirs + ".weight")
            full[dst + ours + ".bias"] = get(src + theirs + ".bias")
        w = get(src + "attn.c_attn.weight").t()
        b = get(src + "attn.c_attn.bias")
        for j, name in enumerate(("q", "k", "v")):
            full[dst + f"attention.{name}.weight"] = w[j * d:(j + 1) * d].contiguous()
        full[dst + "attention.q.bias"], full[dst + "attention.k.bias"] = b[:d].clone(), b[d:2 * d].clone()
        full[dst + "attention.o.weight"] = get(src + "attn.c_proj.weight").t().contiguous()
        full[dst + "ffn.fc_in.weight"] = get(src + "mlp.c_fc.weight").t().contiguous()
        full[dst + "ffn.fc_out.weight"] = get(src + "mlp.c_proj.weight").t().contiguous()
        for name, bias in (("attn V", b[2 * d:]), ("attn c_proj", get(src + "attn.c_proj.bias")),
                           ("mlp c_fc", get(src + "mlp.c_fc.bias")), ("mlp c_proj", get(src + "mlp.c_proj.bias"))):
            if float(bias.abs().max()) > 0:
                dropped.append((f"h.{i}.{name}", float(bias.abs().max())))
    full["head.final_norm.weight"] = get("transformer.ln_f.weight")
    full["head.final_norm.bias"] = get("transformer.ln_f.bias")
    if dropped:
        worst = max(dropped, key=lambda x: x[1])
        say(f"warning: dropped {len(dropped)} nonzero GPT-2 bias vectors (largest |b| = {worst[1]:.3g} in "
            f"{worst[0]}): megatron_entropy's SM+LN+G has no V, O or FFN biases, so its logits differ from the "
            "GPT-2 model's by their effect")
    return full


# ----------------------------------------------------------------------------- our own class

def hf_config(model_cfg, ids: dict, folded: bool = False, fold_beta: bool = True, tie: bool | None = None):
    from megatron_entropy.hf.configuration_megatron_entropy import MegatronEntropyConfig
    from megatron_entropy.model.attention import MIN_TEMPERATURE
    from megatron_entropy.model.ffn import MIN_ABS_ALPHA

    spec = model_cfg.spec()
    return MegatronEntropyConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads, seq_length=model_cfg.seq_length, ffn_hidden_size=model_cfg.ffn_hidden,
        norm=spec.norm, activation=spec.activation, ffn_kind=spec.ffn_kind, ffn_stabilizer=spec.ffn_stabilizer,
        stabilizer_placement=spec.stabilizer_placement, final_norm=spec.final_norm,
        learnable_temperature=spec.learnable_temperature, temperature_param=model_cfg.temperature_param,
        qk_bias=model_cfg.qk_bias, layer_norm_eps=1e-5, min_abs_alpha=MIN_ABS_ALPHA, min_temperature=MIN_TEMPERATURE,
        folded=folded, fold_beta=fold_beta, variant=model_cfg.variant,
        tie_word_embeddings=model_cfg.tie_embeddings if tie is None else tie,
        **{k: v for k, v in ids.items() if v is not None})


def to_ours_state(full: dict, model_cfg) -> dict:
    sd = {}
    for name, tensor in full.items():
        if name.endswith(TRAINING_ONLY):
            continue
        sd["lm_head.weight" if name == "head.output.weight" else "model." + name] = tensor
    if model_cfg.tie_embeddings:
        sd["lm_head.weight"] = full["embedding.tokens.weight"]
    return sd


def build_ours(config, state: dict):
    from megatron_entropy.hf.modeling_megatron_entropy import MegatronEntropyForCausalLM

    model = MegatronEntropyForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"export: tensors do not match the Hugging Face model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model


@torch.no_grad()
def fold_model(model, model_cfg, ids: dict, say=print):
    """A folded copy of an unfolded MegatronEntropyForCausalLM: plain weights, same logits."""
    c = model.config
    layers = model.model.layers
    scaled = c.ffn_stabilizer == "scale"
    no_norms = c.norm == "none" and not c.final_norm
    betas = [float(layer.ffn.beta) for layer in layers] if scaled else []
    fold_beta = scaled and no_norms and all(abs(b) > 1e-6 for b in betas)
    if scaled and not fold_beta:
        say("fold: beta kept as a per-layer residual scale (a LayerNorm follows, so rescaling the residual stream "
            "would not be exact)")
    tie = model_cfg.tie_embeddings and not fold_beta
    sd, s = {}, 1.0  # s: product of the betas so far (the residual stream is x = s * y)
    emb = model.model.embedding
    sd["model.embedding.tokens.weight"] = emb.tokens.weight.clone()
    sd["model.embedding.positions"] = emb.positions.clone()

    def eff(linear):
        return linear.effective_weight().double()

    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        for norm in ("norm1", "norm2"):
            for name, tensor in getattr(layer, norm).named_parameters():
                sd[f"{p}{norm}.{name}"] = tensor.clone()
        att = layer.attention
        for name in ("q", "k", "v", "o"):
            w = eff(getattr(att, name))
            w = w / s if name == "o" else w * s
            sd[f"{p}attention.{name}.weight"] = w.float()
            if getattr(att, name).bias is not None:
                sd[f"{p}attention.{name}.bias"] = getattr(att, name).bias.clone()
        table = att.scale_table()
        sd[f"{p}attention.query_scale"] = (table if table is not None else
                                           torch.full((c.num_heads, c.seq_length), 1.0 / math.sqrt(att.head_dim))).clone()
        ffn = layer.ffn
        first, last = ("fc", "fc") if ffn.fused else ("fc_in", "fc_out")
        w_first, w_last = eff(getattr(ffn, first)), eff(getattr(ffn, last))
        if scaled:
            alpha = float(ffn.alpha.abs().clamp_min(ffn.min_abs_alpha).copysign(ffn.alpha))
            beta = float(ffn.beta)
            if ffn.fused:
                w_first = w_first * (s / (alpha * beta * s) if fold_beta else 1.0 / alpha)
                w_last = w_first
            else:
                if fold_beta:
                    w_first, w_last = w_first * s, w_last / (alpha * beta * s)
                else:
                    w_last = w_last / alpha
            if fold_beta:
                s *= beta
            else:
                sd[f"{p}ffn.beta"] = ffn.beta.clone()
        sd[f"{p}ffn.{first}.weight"] = w_first.float()
        if not ffn.fused:
            sd[f"{p}ffn.{last}.weight"] = w_last.float()
    for name, tensor in model.model.head.final_norm.named_parameters():
        sd[f"model.head.final_norm.{name}"] = tensor.clone()
    sd["lm_head.weight"] = (model.lm_head.weight.double() * s).float()
    config = hf_config(model_cfg, ids, folded=True, fold_beta=fold_beta, tie=tie)
    return build_ours(config, sd)


def hf_model(model_cfg, full: dict, ids: dict, fold: bool = False, say=print):
    """(transformers model in fp32 eval mode, class name) holding the canonical tensors `full`:
    what export_checkpoint saves, built in memory (tools/eval_harness.py evaluates it as it is)."""
    if is_gpt2(model_cfg):
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(gpt2_config(model_cfg, ids)).float().eval()
        missing, unexpected = model.load_state_dict(to_gpt2_state(full, model_cfg), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"export: GPT-2 tensors do not match (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        return model, "GPT2LMHeadModel"
    model = build_ours(hf_config(model_cfg, ids), to_ours_state(full, model_cfg))
    if fold:
        model = fold_model(model, model_cfg, ids, say)
    return model, "MegatronEntropyForCausalLM" + (" (folded)" if fold else "")


# ----------------------------------------------------------------------------- writing

def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _prepare_out(out) -> tuple[Path, Path]:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; pass a new directory")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def save_tokenizer(path: Path, meta: dict, out: Path) -> str | None:
    """Copy the training tokenizer: SentencePiece via our tokenizer class, HF tokenizers as they are."""
    tok = meta.get("tokenizer") or {}
    name = tok.get("file")
    if not name or not (path / name).exists():
        return None
    source = path / name
    if source.is_dir():  # a Hugging Face tokenizer: its own files load natively
        for f in source.iterdir():
            shutil.copyfile(f, out / f.name)
        return "huggingface"
    from megatron_entropy.hf.tokenization_megatron_entropy import MegatronEntropyTokenizer

    MegatronEntropyTokenizer.register_for_auto_class("AutoTokenizer")
    tokenizer = MegatronEntropyTokenizer(vocab_file=str(source))
    tokenizer.save_pretrained(str(out))
    return "sentencepiece"


def save_generation_config(out: Path, ids: dict, seq_length: int) -> None:
    from transformers import GenerationConfig

    GenerationConfig(max_length=seq_length, do_sample=False,
                     **{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(out))


def export_checkpoint(ckpt, out, fold: bool = False, say=print) -> dict:
    """Write checkpoint `ckpt` as a Hugging Face model directory `out`; returns a summary dict."""
    _quiet_transformers()
    out, tmp = _prepare_out(out)
    try:
        path, meta, cfg, full = load_full(ckpt)
        m = cfg.model
        tok_file = path / (meta.get("tokenizer") or {}).get("file", "") if (meta.get("tokenizer") or {}).get("file") \
            else None
        ids = special_ids(tok_file)
        if fold and is_gpt2(m):
            say("fold: SM+LN+G has no inference-time constants to fold; exporting the plain GPT-2")
        model, kind = hf_model(m, full, ids, fold=fold, say=say)
        if kind != "GPT2LMHeadModel":
            from megatron_entropy.hf.configuration_megatron_entropy import MegatronEntropyConfig
            from megatron_entropy.hf.modeling_megatron_entropy import MegatronEntropyForCausalLM

            MegatronEntropyConfig.register_for_auto_class()
            MegatronEntropyForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer = save_tokenizer(path, meta, tmp)
        save_generation_config(tmp, ids, m.seq_length)
        summary = {"source": str(path), "step": meta["step"], "variant": m.variant, "class": kind,
                   "folded": bool(fold and kind != "GPT2LMHeadModel"), "vocab_size": m.vocab_size,
                   "padded_vocab_size_in_training": meta.get("padded_vocab_size"), "tokenizer": tokenizer,
                   "tokenizer_identity": (meta.get("tokenizer") or {}).get("identity"),
                   "source_layout": meta["layout"]}
        (tmp / "megatron_entropy_export.json").write_text(json.dumps(summary, indent=1))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out} ({summary['class']}, {m.variant}, step {meta['step']}, vocabulary {m.vocab_size}"
        f"{', tokenizer ' + tokenizer if tokenizer else ', no tokenizer'})")
    return summary


# ----------------------------------------------------------------------------- our model at one process

def reference_model(cfg, full: dict):
    """megatron_entropy's own GPTModel (one process, eval mode) holding `full`: the parity reference."""
    from megatron_entropy.model.gpt import GPTModel
    from megatron_entropy.parallel.state import ParallelState
    from megatron_entropy.training import reshard

    model = GPTModel(cfg.model, ParallelState.single(), seed=cfg.train.seed).eval()
    names = reshard.canonical_names(model)
    own = model.state_dict()
    state = {}
    for key, current in own.items():
        value = full[names[key]]
        if names[key] in reshard.VOCAB_TENSORS:
            value = reshard._resize_rows(value, current.shape[0])
        state[key] = value.to(current.dtype)
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- GPT-2 -> our checkpoint

def import_gpt2(hf_dir, out, tokenizer: str | None = None, say=print) -> Path:
    """A GPT2LMHeadModel directory -> a weights-only SM+LN+G megatron_entropy checkpoint (TP1)."""
    import yaml
    from transformers import AutoConfig, GPT2LMHeadModel

    import megatron_entropy
    from megatron_entropy.config import Config
    from megatron_entropy.data.tokenizer import load_tokenizer
    from megatron_entropy.model.gpt import GPTModel
    from megatron_entropy.parallel.state import ParallelState
    from megatron_entropy.training import checkpoint as ckpt
    from megatron_entropy.training import reshard

    _quiet_transformers()
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds
        raise CheckpointError(f"cannot read {hf_dir / 'config.json'} ({type(e).__name__}: {e})") from None
    if getattr(hf_cfg, "model_type", None) != "gpt2":
        raise CheckpointError(f"{hf_dir} holds a {getattr(hf_cfg, 'model_type', '?')} model; only GPT-2 "
                              "(GPT2LMHeadModel) converts into an SM+LN+G checkpoint")
    if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{hf_dir}: activation_function={hf_cfg.activation_function!r}; SM+LN+G uses GPT-2's "
                              "tanh GELU (gelu_new)")
    if getattr(hf_cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_cfg, "scale_attn_weights", True):
        raise CheckpointError(f"{hf_dir}: non-standard attention scaling is not supported")
    if abs(float(hf_cfg.layer_norm_epsilon) - 1e-5) > 1e-12:
        say(f"warning: layer_norm_epsilon={hf_cfg.layer_norm_epsilon}; megatron_entropy uses 1e-5")
    out, tmp = _prepare_out(out)
    try:
        model = GPT2LMHeadModel.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32)
        full = from_gpt2_state(model.state_dict(), hf_cfg, say)
        cfg = Config()
        m = cfg.model
        m.variant, m.num_layers, m.hidden_size = "SM+LN+G", hf_cfg.n_layer, hf_cfg.n_embd
        m.num_heads, m.seq_length, m.vocab_size = hf_cfg.n_head, hf_cfg.n_positions, hf_cfg.vocab_size
        m.ffn_hidden_size = hf_cfg.n_inner or 4 * hf_cfg.n_embd
        m.qk_bias, m.tie_embeddings = True, True
        tok_meta = {"path": None, "identity": None, "kind": None, "file": None}
        tag_dir = tmp / ckpt.tag_for(0)
        tag_dir.mkdir()
        source = tokenizer or (str(hf_dir) if any((hf_dir / f).is_file() for f in ("tokenizer.json", "vocab.json",
                                                                                     "tokenizer.model")) else None)
        if source:
            tok = load_tokenizer(source)
            name = ckpt._copy_tokenizer(tok.path, tag_dir)
            tok_meta = {"path": str(source), "identity": tok.identity, "kind": ckpt.tokenizer_kind(tok.path), "file": name}
            cfg.data.tokenizer = str(Path(source).resolve())
        reference = GPTModel(m, ParallelState.single(), seed=cfg.train.seed)
        spec = reshard.local_spec(reference, 1)
        padded = reference.padded_vocab
        del reference
        engine_state = {"lr_scheduler": None, "global_steps": 0, "global_samples": 0, "skipped_steps": 0}
        full_with_defaults = dict(full)
        for name, entry in spec.items():  # training-only tensors GPT-2 lacks: none for SM+LN+G
            if name not in full_with_defaults:
                raise CheckpointError(f"import: GPT-2 gives no value for {name}")
        reshard.write_layout(full_with_defaults, spec, tag_dir, 1, 1, m.num_layers, padded, engine_state, True)
        meta = {
            "format_version": ckpt.METADATA_VERSION, "kind": "megatron_entropy checkpoint", "step": 0,
            "config": cfg.to_dict(),
            "layout": {"world_size": 1, "tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 0, "precision": "fp32"},
            "optimizer_state": "none", "padded_vocab_size": padded, "true_vocab_size": m.vocab_size,
            "variant_spec": m.spec().to_dict(), "sampler": None, "consumed_samples": 0, "data_seed": cfg.data.seed,
            "rng": None, "tokenizer": tok_meta,
            "shard_spec": {"tensors": spec, "tied": {"head.output.weight": "embedding.tokens.weight"}},
            "pipeline_layers": None, "engine": engine_state, "versions": ckpt._versions(),
            "imported_from": {"path": str(hf_dir), "class": "GPT2LMHeadModel",
                              "megatron_entropy": megatron_entropy.__version__},
        }
        meta["files"] = ckpt._file_sizes(tag_dir)
        (tag_dir / ckpt.METADATA_NAME).write_text(json.dumps(meta, indent=1))
        (tmp / ckpt.LATEST).write_text(tag_dir.name)
        preset = {"model": {k: getattr(m, k) for k in ("variant", "num_layers", "hidden_size", "num_heads",
                                                       "seq_length", "ffn_hidden_size", "vocab_size", "qk_bias")}}
        if cfg.data.tokenizer:
            preset["data"] = {"tokenizer": cfg.data.tokenizer}
        (tmp / "config.yaml").write_text("# model settings of the imported GPT-2; train.py --config this_file\n"
                                         + yaml.safe_dump(preset, sort_keys=False))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out / ckpt.tag_for(0)} (SM+LN+G, {m.num_layers} layers, d={m.hidden_size}, vocabulary "
        f"{m.vocab_size}); continue training with: train.py --config {out / 'config.yaml'} --train.resume {out}")
    return out / ckpt.tag_for(0)


__all__ = ["export_checkpoint", "fold_model", "hf_model", "import_gpt2", "is_gpt2", "load_full", "reference_model"]
