#!/usr/bin/env python
"""Perplexity of a checkpoint or of a Hugging Face model directory on token shards.

    python tools/eval_ppl.py (CKPT | HF_DIR) --data PREFIX [--data PREFIX ...] [--batch-size 8]
                             [--max-samples N] [--json]

CKPT: a checkpoint written by train.py (any layout or ZeRO stage; evaluated in one process with
megatron_entropy's own model). HF_DIR: a directory from tools/convert_to_hf.py (or any causal LM that
transformers loads; trust_remote_code=True). PREFIX: token shards from tools/preprocess_data.py (the
embedded corpus' validation shard works too). Samples are consecutive windows of the model's
sequence length (as in training); the loss is the mean next-token cross entropy over every token.
A progress bar goes to stderr. Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402


def load_model(source: str):
    """(logits function, sequence length, vocabulary size, tokenizer identity or None, description)."""
    import torch

    path = Path(source)
    if not (path / "config.json").is_file():  # a checkpoint (CheckpointError says what is wrong with it)
        from megatron_entropy.hf.export import load_full, reference_model

        tag_dir, meta, cfg, full = load_full(path)
        model = reference_model(cfg, full)
        identity = (meta.get("tokenizer") or {}).get("identity")
        return (lambda ids: model(ids)), cfg.model.seq_length, cfg.model.vocab_size, identity, \
            f"checkpoint {tag_dir} (step {meta['step']})"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many kinds
        fail(f"cannot load {source} with transformers ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    c = model.config
    seq = next(getattr(c, k) for k in ("seq_length", "n_positions", "max_position_embeddings") if getattr(c, k, None))
    identity = None
    export = path / "megatron_entropy_export.json"
    if export.is_file():
        identity = json.loads(export.read_text()).get("tokenizer_identity")
    return (lambda ids: model(ids).logits), seq, c.vocab_size, identity, f"{type(model).__name__} {path}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="CKPT_OR_HF_DIR")
    parser.add_argument("--data", action="append", required=True, metavar="PREFIX", help="token shard prefix")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_samples < 0:
        fail("--batch-size must be >= 1 and --max-samples >= 0")

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from megatron_entropy.data import DataError
    from megatron_entropy.data.dataset import TokenChunkDataset, collate
    from megatron_entropy.training.checkpoint import CheckpointError

    try:
        logits_of, seq, vocab, identity, described = load_model(args.model)
        dataset = TokenChunkDataset(args.data, seq, expected_tokenizer_identity=identity)
    except (CheckpointError, DataError) as e:
        fail(str(e))
    if dataset.vocab_size > vocab:
        fail(f"the shards use a vocabulary of {dataset.vocab_size} but the model has {vocab}; "
             "use shards made with the model's tokenizer")
    n = len(dataset) if not args.max_samples else min(args.max_samples, len(dataset))
    nll, tokens = 0.0, 0
    with torch.no_grad(), tqdm(total=n, unit="sample", file=sys.stderr, disable=args.no_progress,
                               desc="eval_ppl") as bar:
        for start in range(0, n, args.batch_size):
            batch = collate(dataset, range(start, min(n, start + args.batch_size)))
            inputs, labels = batch.tokens, batch.labels
            logits = logits_of(inputs).float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         reduction="sum").double())
            tokens += labels.numel()
            bar.update(inputs.shape[0])
    loss = nll / tokens
    result = {"model": described, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "samples": n,
              "seq_length": seq}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{described}: loss {loss:.6f} | perplexity {math.exp(loss):.4f} | {tokens} tokens "
              f"({n} samples of {seq})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
