#!/usr/bin/env python
"""Redraw a run's entropy figures (PNG) from <RUN_DIR>/metrics.jsonl.

    python tools/plot_entropy.py runs/my_run [--out DIR]

Writes, as the data allow: entropy_heatmap.png (paper Fig. 3), entropy_bins.png (Fig. 2a),
layer_entropy.png (Fig. 5), thresholds.png (Fig. 6, EReg runs), temperature.png (SM(t) runs),
nan_counts.png and loss.png, into DIR (default RUN_DIR/figures).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser  # noqa: E402
from megatron_entropy.analysis.plots import read_metrics, render_run_figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory containing metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/figures)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(r.get("kind") in ("train", "eval") for r in records):
        print(f"error: {Path(args.run_dir) / 'metrics.jsonl'} has no train or eval records to plot", file=sys.stderr)
        return 2
    for path in render_run_figures(args.run_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
