#!/usr/bin/env python
"""Reduced reproduction study on CPU: the paper's three findings with seeds and intervals, report.md.

    python tools/reproduce.py --smoke --out runs/smoke          # 2 tiny variants, 1 seed: under a minute
    python tools/reproduce.py --out runs/study                  # the full study: under 60 minutes on 2 cores
    python tools/reproduce.py --variants SM SM+LN+G --seeds 3 --no-sensitivities --steps 500

The main arms (SM+LN+G, SM, SM+ScFuFFN, EReg(SM(t)+ScFuFFN)) train with every seed; the sensitivity
arms (temperature parameterisation and init, theta init, lambda with each penalty reduction) with
the first seed. The report states per finding (SM collapse in deep layers, entropic overload in
early layers, EReg's gain over SM+ScFuFFN) whether it is reproduced, with mean +- 95 % intervals
and Welch tests. Any `--section.key value` is passed to every train.py run (after the study's own
overrides, so it wins).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis import study, study_report  # noqa: E402
from megatron_entropy.analysis.cli import OneLineParser, fail, split_overrides  # noqa: E402
from megatron_entropy.analysis.study_presets import FULL, SMOKE  # noqa: E402
from megatron_entropy.config import ConfigError, build_config  # noqa: E402
from megatron_entropy.model.variants import VARIANTS  # noqa: E402


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           epilog="Config overrides such as --model.num_layers 4 go to every training run.")
    parser.add_argument("--smoke", action="store_true", help="2 variants, tiny model, 1 seed, 20 steps (under a minute)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/reproduce[-smoke]); must be empty or new")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help=f"main arms (default: {', '.join(FULL.variants)})")
    parser.add_argument("--seeds", type=int, metavar="N", help=f"seeds per main arm (default {len(FULL.seeds)})")
    parser.add_argument("--no-sensitivities", action="store_true", help="train only the main arms")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps per run")
    parser.add_argument("--jobs", type=int, metavar="J", help="runs in parallel, each with CPUs/J threads (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite DIR/report.md from the runs already in DIR (same options as the study)")
    parser.add_argument("--print-commands", action="store_true", help="print the train.py commands and exit")
    return parser


def resolve_settings(args, overrides: list[str]) -> study.StudySettings:
    settings = SMOKE if args.smoke else FULL
    if args.variants:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        settings = dataclasses.replace(settings, variants=tuple(args.variants))
    for name in ("seeds", "steps", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} {value} must be >= 1")
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(1, args.seeds + 1)))
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.jobs is not None:
        settings = dataclasses.replace(settings, jobs=args.jobs)
    if args.no_sensitivities:
        settings = dataclasses.replace(settings, sensitivities=())
    settings = dataclasses.replace(settings, overrides=settings.overrides + overrides)
    for run in study.plan(settings):  # fail before training anything, and before writing anything
        build_config(settings.preset, [*study.train_command(run, Path("x"), settings)[4:]]).validate(1)
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
            print(" ".join(study.quote(a) for a in command))
        return 0
    if args.report_only:
        if not (out / "runs").is_dir():
            fail(f"{out / 'runs'} does not exist; --report-only needs the --out directory of an earlier study")
        planned = study.plan(settings)
        finished = [r for r in planned if (out / "runs" / r.name / "study_run.json").is_file()]
        missing = [r.name for r in planned if r not in finished]  # a study cut short: report what ran
        outcomes = [study.load_outcome(r, out) for r in finished]
        report = study_report.write_report(out, [study.summarize_run(o) for o in outcomes], settings, None,
                                           missing=missing)
        print(f"report: {report}")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} exists and is not empty; pass a new --out directory")
    if not (study.ROOT / "train.py").is_file():
        fail(f"{study.ROOT / 'train.py'} does not exist; the study needs the training script")
    # SIGTERM -> SystemExit in the main thread; run_all then kills the runs in flight.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    runs = study.plan(settings)
    print(f"study: {len(runs)} runs ({len(settings.variants)} arms x {len(settings.seeds)} seeds + "
          f"{len(settings.sensitivities)} sensitivities) x {settings.steps} steps -> {out}", flush=True)
    outcomes = study.run_all(out, settings, say=lambda m: print(m, flush=True))
    total = time.perf_counter() - started
    report = study_report.write_report(out, [study.summarize_run(o) for o in outcomes], settings, total)
    print(f"report: {report} ({total:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
