#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face model directory.

    python tools/convert_to_hf.py CKPT OUT [--fold] [--no-check]

CKPT: a checkpoint written by train.py (tag directory or save directory with `latest`), any
TP x PP x DP layout and ZeRO stage. OUT: a new directory with safetensors weights, config,
tokenizer and generation config. SM+LN+G becomes a native GPT2LMHeadModel; every other variant
MegatronEntropyForCausalLM (load with trust_remote_code=True). --fold folds weight/spectral norm,
alpha, beta and the temperature into plain weights (same logits). After writing, the tool loads OUT
with transformers and compares its logits with megatron_entropy's own model on a random batch
(--no-check skips this). Bad input: one `error:` line, exit code 2, nothing written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402


def parity(ckpt: str, out: str, batch: int = 2) -> float:
    """max |HF logits - our logits| / max |our logits| on random tokens (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from megatron_entropy.hf.export import load_full, reference_model

    _, _, cfg, full = load_full(ckpt)
    ours = reference_model(cfg, full)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits.float(), ours(ids).float()
    return float((a - b).abs().max() / b.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint (tag directory or save directory)")
    parser.add_argument("out", metavar="OUT", help="new output directory")
    parser.add_argument("--fold", action="store_true", help="fold inference-time constants into plain weights")
    parser.add_argument("--no-check", action="store_true", help="skip the logits comparison after writing")
    args = parser.parse_args(argv)

    from megatron_entropy.hf.export import export_checkpoint
    from megatron_entropy.training.checkpoint import CheckpointError

    try:
        export_checkpoint(args.ckpt, args.out, fold=args.fold)
    except CheckpointError as e:
        fail(str(e))
    if not args.no_check:
        rel = parity(args.ckpt, args.out)
        print(f"check: max |logits(transformers) - logits(megatron_entropy)| / max |logits| = {rel:.2e}")
        if rel > 1e-4:
            fail(f"the exported model's logits differ from the checkpoint's by {rel:.2e} (relative); "
                 "please report this", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
