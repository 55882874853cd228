#!/usr/bin/env python
"""Downstream evaluation with lm-evaluation-harness, offline, on the shipped local tasks.

    python tools/eval_harness.py (CKPT | HF_DIR) [--tasks me_next_line,me_rolling_ppl] [--limit N]
                                 [--batch-size 16] [--include-path DIR ...] [--builtin-tasks]
                                 [--output results.json] [--log-samples] [--json] [--no-progress]

CKPT: a checkpoint written by train.py (tag or save directory; any TP x PP x DP layout and ZeRO
stage), converted in memory into the model tools/convert_to_hf.py exports. HF_DIR: a directory from
tools/convert_to_hf.py or any causal LM transformers loads (trust_remote_code=True). --tasks: task
names or tags (default: the tag megatron_entropy, every shipped task; docs/evaluation.md says what
they measure). --include-path adds a directory of your own lm-eval YAML tasks; --builtin-tasks
indexes lm-eval's own (their data sets must already be in the local Hugging Face cache). Needs the
`eval` extra (pip install -e .[eval]). Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis.cli import OneLineParser, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="CKPT_OR_HF_DIR")
    parser.add_argument("--tasks", default="megatron_entropy", help="comma-separated task names or tags")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N documents of each task (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more YAML tasks")
    parser.add_argument("--builtin-tasks", action="store_true", help="also index lm-eval's built-in tasks")
    parser.add_argument("--output", metavar="FILE", help="write lm-eval's full results (JSON) here")
    parser.add_argument("--log-samples", action="store_true", help="keep every request's result in --output")
    parser.add_argument("--json", action="store_true", help="print one JSON line of metrics instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or args.batch_size < 1 or args.limit < 0:
        fail("--tasks must name at least one task, --batch-size must be >= 1 and --limit >= 0")
    for directory in args.include_path:
        if not Path(directory).is_dir():
            fail(f"--include-path {directory} is not a directory of lm-eval YAML tasks")
    if args.output and Path(args.output).exists():
        fail(f"--output {args.output} already exists; pass a new file name")

    from megatron_entropy.downstream import harness
    from megatron_entropy.training.checkpoint import CheckpointError

    try:
        harness.require_lm_eval()
        manager = harness.task_manager(args.include_path, builtin=args.builtin_tasks)
        harness.check_tasks(tasks, manager)
        model = harness.load(args.model)
        with open(os.devnull, "w") as sink, \
                (contextlib.redirect_stderr(sink) if args.no_progress else contextlib.nullcontext()):
            results = harness.evaluate(model, tasks, manager, batch_size=args.batch_size,
                                       limit=args.limit or None, log_samples=args.log_samples)
    except (harness.HarnessError, CheckpointError) as e:
        fail(str(e))
    metrics = harness.metrics_of(results)
    if args.output:
        Path(args.output).write_text(json.dumps({"model": model.description, **results}, indent=1))
    if args.json:
        print(json.dumps({"model": model.description, **metrics}))
    else:
        print(model.description)
        for key, value in metrics.items():
            if not key.endswith("_stderr"):
                stderr = metrics.get(key + "_stderr")
                print(f"  {key:34s} {value:.4f}" + (f" +- {stderr:.4f}" if stderr is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
