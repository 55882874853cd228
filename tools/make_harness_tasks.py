#!/usr/bin/env python
"""(Re)write the shipped lm-eval tasks from the embedded corpus' held-out files.

    python tools/make_harness_tasks.py [--out DIR]

Default DIR: megatron_entropy/downstream/task_files (the committed copy). Deterministic for a given
Python version (the corpus is its standard library); see megatron_entropy/downstream/local_tasks.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser  # noqa: E402
from megatron_entropy.downstream.local_tasks import TASK_DIR, build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(TASK_DIR), help="output directory (default: the shipped copy)")
    args = parser.parse_args(argv)
    manifest = build(Path(args.out))
    print(f"wrote {args.out}: {json.dumps(manifest['examples'])} (Python {manifest['python']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
