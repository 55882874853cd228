#!/usr/bin/env python
"""Start a megatron_entropy SM+LN+G checkpoint from a Hugging Face GPT-2 (GPT2LMHeadModel) directory.

    python tools/convert_from_hf.py HF_DIR OUT [--tokenizer PATH]

OUT becomes a save directory (weights only, step 0, TP1) plus OUT/config.yaml with the model
settings. Continue training it in any layout with
    python train.py --config OUT/config.yaml --train.resume OUT [--parallel.tensor N ...]
GPT-2's V, O and FFN biases have no counterpart in megatron_entropy's SM+LN+G; nonzero ones are
dropped with a warning. The tokenizer is taken from HF_DIR when it has one (or --tokenizer).
Bad input: one `error:` line, exit code 2, nothing written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", metavar="HF_DIR", help="a GPT2LMHeadModel directory (config.json + weights)")
    parser.add_argument("out", metavar="OUT", help="new output directory")
    parser.add_argument("--tokenizer", help="tokenizer (.model file or directory) to record with the checkpoint")
    args = parser.parse_args(argv)

    from megatron_entropy.data import DataError
    from megatron_entropy.hf.export import import_gpt2
    from megatron_entropy.training.checkpoint import CheckpointError

    try:
        import_gpt2(args.hf_dir, args.out, tokenizer=args.tokenizer)
    except (CheckpointError, DataError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
