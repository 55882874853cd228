"""lm-evaluation-harness on our models: a checkpoint (any layout), a Hugging Face directory, or the
live model of a training run, through lm-eval's own `HFLM` client.

A checkpoint is converted in memory into exactly the transformers model tools/convert_to_hf.py
would save (hf/export.py `hf_model`: GPT2LMHeadModel for SM+LN+G, MegatronEntropyForCausalLM
otherwise) and handed to HFLM as an instance; no temporary directory, and the two routes evaluate
the same computation. Tasks come from the shipped task set (local_tasks.py) plus any `include_paths`;
lm-eval's built-in tasks are indexed only on request (they download their data sets, and indexing
them costs ~20 s).

Conventions (the same on every route): contexts are truncated on the left to the model's sequence
length; the token before a document (rolling perplexity) and before an empty context is the
tokenizer's end-of-document token, as between documents in training; no BOS is added; fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from megatron_entropy.downstream.local_tasks import INSTALL_HINT, TASK_DIR, shipped_task_names
from megatron_entropy.training.checkpoint import CheckpointError


class HarnessError(ValueError):
    """A one-line, user-facing problem with the evaluation request."""


def require_lm_eval() -> None:
    try:
        import accelerate  # noqa: F401  (HFLM imports it)
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessError(INSTALL_HINT) from None


@dataclasses.dataclass
class HarnessModel:
    model: object  # a transformers PreTrainedModel in eval mode
    tokenizer: object  # a transformers tokenizer that encodes exactly like training
    seq_length: int
    description: str


def tokenizer_from_file(path) -> object:
    """The training tokenizer as a transformers tokenizer: SentencePiece .model or an HF directory."""
    path = Path(path)
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from megatron_entropy.hf.tokenization_megatron_entropy import MegatronEntropyTokenizer

    return MegatronEntropyTokenizer(vocab_file=str(path))


def model_from_state(model_cfg, full: dict, tokenizer_path, description: str) -> HarnessModel:
    """Canonical full tensors (hf/export.py names) -> the exported transformers model, in memory."""
    from megatron_entropy.hf.export import hf_model, special_ids

    if not tokenizer_path:
        raise HarnessError("the model has no tokenizer to encode the tasks' text; train with data.tokenizer "
                           "set (or the embedded corpus, which has one)")
    ids = special_ids(tokenizer_path)  # (all None for a Hugging Face tokenizer directory)
    model, kind = hf_model(model_cfg, full, ids, say=lambda *_: None)
    return HarnessModel(model, tokenizer_from_file(tokenizer_path), model_cfg.seq_length, f"{description}, {kind}")


def load_checkpoint(source) -> HarnessModel:
    from megatron_entropy.hf.export import load_full

    path, meta, cfg, full = load_full(source)  # CheckpointError names what is wrong
    name = (meta.get("tokenizer") or {}).get("file")
    tokenizer = path / name if name and (path / name).exists() else None
    return model_from_state(cfg.model, full, tokenizer, f"checkpoint {path} (step {meta['step']})")


def load_hf_dir(path: Path) -> HarnessModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, local_files_only=True,
                                                     dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise HarnessError(f"cannot load {path} with transformers ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:200]})") from None
    c = model.config
    seq = next(getattr(c, k) for k in ("seq_length", "n_positions", "max_position_embeddings") if getattr(c, k, None))
    return HarnessModel(model, tokenizer, int(seq), f"{type(model).__name__} {path}")


def load(source) -> HarnessModel:
    """A checkpoint (tag or save directory) or a Hugging Face model directory (it has config.json)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{source} does not exist; pass a checkpoint (tag or save directory) or a "
                              "Hugging Face model directory")
    return load_hf_dir(path) if (path / "config.json").is_file() else load_checkpoint(path)


def task_manager(include_paths=(), builtin: bool = False):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASK_DIR), *map(str, include_paths)], include_defaults=builtin)


def check_tasks(tasks: list[str], manager) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"unknown lm-eval task {', '.join(unknown)}; the shipped tasks are "
                           f"{', '.join(shipped_task_names())} (tag megatron_entropy); add --include-path DIR for "
                           "your own YAML tasks")


def quiet() -> None:
    """lm-eval logs every request batch and a warning for an in-memory model; keep warnings only."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def evaluate(hm: HarnessModel, tasks: list[str], manager=None, batch_size: int = 16, limit: int | None = None,
             log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on `hm`; returns its results dict (JSON-able)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    quiet()
    manager = manager or task_manager()
    check_tasks(tasks, manager)
    lm = HFLM(pretrained=hm.model, tokenizer=hm.tokenizer, backend="causal", batch_size=batch_size,
              max_length=hm.seq_length, prefix_token_id=hm.tokenizer.eos_token_id)
    # No global seeding (None): a run evaluated mid-training must keep its own RNG streams.
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=log_samples, bootstrap_iters=1000, random_seed=None,
                              numpy_random_seed=None, torch_random_seed=None)
    return json.loads(json.dumps(results, default=str))  # numpy scalars and dtypes -> plain JSON


def metrics_of(results: dict) -> dict[str, float]:
    """{"task/metric": value} of lm-eval's results (filter "none" dropped; stderrs kept as *_stderr)."""
    flat = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
                flat[f"{task}/{metric}" + ("" if filt == "none" else f"_{filt}")] = float(value)
    return flat


__all__ = ["HarnessError", "HarnessModel", "INSTALL_HINT", "evaluate", "load", "metrics_of", "model_from_state",
           "require_lm_eval", "task_manager"]
