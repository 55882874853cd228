#!/usr/bin/env python
"""Convert a checkpoint to another tensor/pipeline-parallel layout (weights, and Adam moments where readable).

    python tools/reshard_checkpoint.py SRC DST --tensor N --pipeline M

SRC: a checkpoint directory written by train.py (a tag directory, or a save directory with
`latest`), any TP x PP x DP layout and ZeRO stage. DST: a new directory; it becomes a save directory
that `train.py --parallel.tensor N --parallel.pipeline M --train.resume DST` continues from. The LR
schedule, step counter and data position are carried; so are Adam's moments when SRC is fp32
ZeRO-0 or ZeRO-1/2 without pipeline parallelism (docs/checkpoints.md); otherwise the resumed run
re-initialises the optimizer. The tool says which.
Bad input: one `error:` line, exit code 2, nothing written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="checkpoint (tag directory or save directory)")
    parser.add_argument("dst", metavar="DST", help="new output directory")
    parser.add_argument("--tensor", type=int, default=1, help="target tensor-parallel size (default 1)")
    parser.add_argument("--pipeline", type=int, default=1, help="target pipeline-parallel size (default 1)")
    args = parser.parse_args(argv)

    from megatron_entropy.training.checkpoint import CheckpointError
    from megatron_entropy.training.reshard import reshard_checkpoint

    try:
        reshard_checkpoint(args.src, args.dst, args.tensor, args.pipeline)
    except CheckpointError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
