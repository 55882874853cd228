#!/usr/bin/env python
"""Reduced reproduction study on CPU: train a few variants on the embedded corpus, write report.md.

    python tools/reproduce.py --smoke --out runs/smoke          # 2 tiny variants, about a minute
    python tools/reproduce.py --out runs/study                  # 5 variants, under 30 minutes on 2 cores
    python tools/reproduce.py --variants SM SM+ScFuFFN --steps 200 --model.num_layers 4

Compares SM+LN+G, SM+LN+R, SM, SM+ScFuFFN and EReg(SM(t)+ScFuFFN): final validation perplexity,
NaNs/instability, early vs deep layer entropy, overloaded (top bin) and collapsed (bottom bin)
heads, with heatmaps and a generated "what we observed" section. Any `--section.key value` is
passed to every train.py run (after the study's own size overrides, so it wins).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis import study  # noqa: E402
from megatron_entropy.analysis.cli import OneLineParser, fail, split_overrides  # noqa: E402
from megatron_entropy.config import ConfigError, build_config  # noqa: E402
from megatron_entropy.model.variants import VARIANTS  # noqa: E402


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           epilog="Config overrides such as --model.num_layers 4 go to every training run.")
    parser.add_argument("--smoke", action="store_true", help="2 variants, tiny model, 20 steps (about a minute)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/reproduce[-smoke]); must be empty or new")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help=f"default: {', '.join(study.STUDY_VARIANTS)}")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps per variant")
    parser.add_argument("--jobs", type=int, metavar="J", help="runs in parallel, each with CPUs/J threads (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite DIR/report.md from the runs already in DIR (same options as the study)")
    parser.add_argument("--print-commands", action="store_true", help="print the train.py commands and exit")
    return parser


def resolve_settings(args, overrides: list[str]) -> study.StudySettings:
    settings = study.SMOKE if args.smoke else study.FULL
    if args.variants:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        settings = dataclasses.replace(settings, variants=tuple(args.variants))
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps} must be >= 1")
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs} must be >= 1")
        settings = dataclasses.replace(settings, jobs=args.jobs)
    settings = dataclasses.replace(settings, overrides=settings.overrides + overrides)
    for variant in settings.variants:  # fail before training anything, and before writing anything
        build_config(settings.preset, settings.overrides + ["--model.variant", variant,
                                                            "--train.max_steps", str(settings.steps)]).validate(1)
    return settings


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        settings = resolve_settings(args, overrides)
    except ConfigError as e:
        fail(str(e))
    out = Path(args.out or ("runs/reproduce-smoke" if args.smoke else "runs/reproduce"))
    if args.print_commands:
        for command in study.settings_commands(out, settings):
            print(" ".join(study._quote(a) for a in command))
        return 0
    if args.report_only:
        if not (out / "runs").is_dir():
            fail(f"{out / 'runs'} does not exist; --report-only needs the --out directory of an earlier study")
        print(f"report: {study.report_only(out, settings)}")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} exists and is not empty; pass a new --out directory")
    if not (study.ROOT / "train.py").is_file():
        fail(f"{study.ROOT / 'train.py'} does not exist; the study needs the training script")
    # SIGTERM -> SystemExit in the main thread; run_study then kills the runs in flight.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    print(f"study: {len(settings.variants)} variants x {settings.steps} steps -> {out}", flush=True)
    report = study.run_study(out, settings, say=lambda m: print(m, flush=True))
    print(f"report: {report} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
