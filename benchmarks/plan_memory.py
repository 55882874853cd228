#!/usr/bin/env python
"""The planner's memory prediction against measured peak memory per rank (CPU, real train.py runs).

    python benchmarks/plan_memory.py                 # the default grid (~10-20 min on 2 cores)
    python benchmarks/plan_memory.py --quick         # three cases
    python benchmarks/plan_memory.py --json out.json

Each case is a real `train.py` run (DeepSpeed engine, gloo, the embedded corpus, a few steps), one
process per rank started here so that os.wait4 returns each rank's own peak resident set
(benchmarks/peak_worker.py). What is compared:
    measured  = peak live heap bytes of the rank (glibc mallinfo2, sampled every ms)  -  the same
                for the same command with a 1-layer, d = 16 model
                (the baseline: Python, torch, DeepSpeed, gloo, the data, the training loop)
    predicted = analysis/plan.py's peak for the case  -  its peak for the baseline model
so both sides count what the model, its gradients, the optimizer, ZeRO's buffers and the
activations add. The planner is given device="cpu" (the blocked fused core's saved tensors) and
zero reduce buckets at DeepSpeed's defaults. Errors are (predicted - measured) / measured.
Live bytes, not peak RSS: glibc keeps freed blocks (peak RSS grew by ~120 MiB between the first and
third step of a 12.6 M-parameter run with the same live set), which says more about the allocator
than about the model; the extra peak RSS is printed alongside. On a GPU the caching allocator's
slack is what the planner's 5% reserve is for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_entropy.analysis import plan  # noqa: E402
from megatron_entropy.config import build_config  # noqa: E402

DATA = ["--data.corpus_max_bytes", "300000", "--data.tokenizer_vocab_size", "512"]
QUIET = ["--logging.wandb", "off", "--logging.figures", "false", "--logging.progress_bar", "false",
         "--train.save_dir", "", "--train.eval_interval", "0", "--train.eval_iters", "1", "--logging.log_interval", "1",
         "--train.lr", "3e-4"]  # the tiny preset's 3e-3 diverges at these widths (memory does not depend on it)
BASELINE_MODEL = {"num_layers": 1, "hidden_size": 16, "num_heads": 4}


def baseline_model(case) -> dict:
    """The negligible model of a case's baseline run: one layer per pipeline stage."""
    return dict(BASELINE_MODEL, num_layers=case.pp)


@dataclass(frozen=True)
class Case:
    name: str
    layers: int = 4
    hidden: int = 768
    heads: int = 12
    seq: int = 512
    micro: int = 2
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    precision: str = "fp32"
    recompute: bool = False
    core: str = "fused"
    variant: str = "EReg(SM(t)+ScFuFFN)"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def args(self, model: dict | None = None) -> list[str]:
        m = {"num_layers": self.layers, "hidden_size": self.hidden, "num_heads": self.heads, **(model or {})}
        out = ["--config", "tiny", "--deepspeed", str(REPO / "ds_configs" / f"zero{self.zero}.json")]
        for key, value in m.items():
            out += [f"--model.{key}", str(value)]
        steps = 2 * self.pp  # pipeline: enough micro-batches for every stage's 1F1B
        out += ["--model.seq_length", str(self.seq), "--model.variant", self.variant,
                "--model.attention_core", self.core, "--parallel.tensor", str(self.tp),
                "--parallel.pipeline", str(self.pp), "--parallel.activation_checkpointing", str(self.recompute).lower(),
                "--train.micro_batch_size", str(self.micro),
                "--train.global_batch_size", str(self.micro * steps * self.dp),
                "--train.precision", self.precision, "--train.max_steps", "3", "--train.warmup_steps", "1"]
        return out + DATA + QUIET


GRID = [
    Case("base fp32 ZeRO-0"),
    Case("recompute", recompute=True),
    Case("ZeRO-1", zero=1),
    Case("ZeRO-2", zero=2),
    Case("ZeRO-3", zero=3),
    Case("bf16 ZeRO-0", precision="bf16"),
    Case("bf16 ZeRO-1 recompute", precision="bf16", zero=1, recompute=True),
    Case("eager core T=256", core="eager", seq=256),
    Case("wide d=1024 L=2", layers=2, hidden=1024, heads=16),
    Case("SM+LN+G", variant="SM+LN+G"),
    Case("TP2", tp=2),
    Case("TP2 ZeRO-1 recompute", tp=2, zero=1, recompute=True),
    Case("PP2", pp=2),
    Case("DP2 ZeRO-1", dp=2, zero=1),
    Case("DP2 ZeRO-2", dp=2, zero=2),
    Case("DP2 ZeRO-3", dp=2, zero=3),
    Case("DP2 bf16 ZeRO-1", dp=2, zero=1, precision="bf16"),
]
QUICK = [GRID[0], GRID[1], GRID[10]]
# The 1b preset's full width and sequence (d 2560, 20 heads, T 2048) with 2 of its 28 layers, TP2,
# the fused core and recompute; fp32: this CPU has no native bf16 (no avx512_bf16 / AMX).
REHEARSAL = [Case("1b width L2 TP2 recompute", layers=2, hidden=2560, heads=20, seq=2048, micro=1, tp=2, zero=1,
                  recompute=True)]


def run_ranks(args: list[str], world: int, timeout: float) -> list[dict]:
    """Start train.py once per rank under peak_worker.py; each rank's {peak_live, ru_maxrss} in bytes."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    tmp = Path(tempfile.mkdtemp(prefix="plan_memory_"))
    procs = [subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "peak_worker.py"), *args], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), PEAK_FILE=str(tmp / f"{r}.json")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.time() + timeout
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise TimeoutError("benchmark case ran past its timeout") from None
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"rank {rank} failed:\n{out[-3000:]}")
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(world)]


def predicted(case: Case, model: dict | None = None) -> list[int]:
    """The planner's peak per rank (ordered by rank: TP fastest, then pipeline stage)."""
    cfg = build_config("tiny", case.args(model)[4:-len(DATA) - len(QUIET)] + ["--model.vocab_size", "512"])
    shape = plan.ModelShape.from_model_config(cfg.model)
    lay = plan.Layout(nodes=1, gpus_per_node=case.world, tensor=case.tp, pipeline=case.pp, zero=case.zero,
                      micro_batch=case.micro, global_batch=cfg.train.global_batch_size, precision=case.precision,
                      recompute=case.recompute, core=case.core, device="cpu")
    # DeepSpeed's topology orders ranks (pipe, data, model): TP fastest, then DP, then the stage.
    return [plan.memory(shape, lay, stage).total for stage in range(case.pp) for _ in range(case.dp * case.tp)]


def replan(rows: list[dict]) -> int:
    """Re-predict saved measurements (the measurement does not depend on the planner)."""
    for row in rows:
        case = Case(**row["case_config"])
        base = replace(case, recompute=False)
        want = predicted(case)[row["rank"]] - predicted(base, baseline_model(case))[row["rank"]]
        row.update(predicted=want, error=(want - row["measured"]) / row["measured"])
    print_rows(rows)
    return 0


def print_rows(rows: list[dict]) -> None:
    print(f"{'case':26s} {'rank':>4s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error':>7s} {'peak RSS MiB':>12s}")
    for r in rows:
        print(f"{r['case']:26s} {r['rank']:4d} {r['measured'] / 2**20:12.1f} {r['predicted'] / 2**20:13.1f} "
              f"{100 * r['error']:+6.1f}% {r['peak_rss_extra'] / 2**20:12.1f}")
    print_summary(rows)


def print_summary(rows: list[dict]) -> None:
    worst = max(abs(r["error"]) for r in rows)
    within = sum(abs(r["error"]) <= 0.10 for r in rows)
    print(f"\n{within}/{len(rows)} rank measurements within 10%; worst |error| {100 * worst:.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rehearsal", action="store_true", help="the 1b width rehearsal (a few minutes per run)")
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--json", help="write the rows here (after every case)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --json")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--from-json", nargs="+", metavar="FILE",
                    help="no runs: compare the measurements saved in these files with today's planner")
    args = ap.parse_args()
    if args.from_json:
        return replan([row for f in args.from_json for row in json.loads(Path(f).read_text())])
    cases = REHEARSAL if args.rehearsal else QUICK if args.quick else GRID
    if args.only:
        cases = [c for c in GRID + REHEARSAL if c.name in args.only]
    rows = []
    keep = args.json and args.append and Path(args.json).exists()
    previous = json.loads(Path(args.json).read_text()) if keep else []
    print(f"{'case':26s} {'rank':>4s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error':>7s} "
          f"{'peak RSS MiB':>12s}", flush=True)
    baselines = {}
    for case in cases:
        key = (case.world, case.tp, case.pp, case.dp, case.zero, case.precision)
        if key not in baselines:  # the same launch with a negligible model
            base_case = replace(case, recompute=False)
            baselines[key] = (run_ranks(base_case.args(baseline_model(case)), case.world, args.timeout),
                              predicted(base_case, baseline_model(case)))
        base_rss, base_pred = baselines[key]
        started = time.time()
        rss = run_ranks(case.args(), case.world, args.timeout)
        print(f"# {case.name}: {time.time() - started:.0f} s for 3 steps of {case.micro * 2 * case.pp} sequences "
              "(with start-up)", flush=True)
        pred = predicted(case)
        for rank, (r, b, p, bp) in enumerate(zip(rss, base_rss, pred, base_pred)):
            measured, want = r["peak_live"] - b["peak_live"], p - bp
            err = (want - measured) / measured
            rss_extra = r["ru_maxrss"] - b["ru_maxrss"]
            rows.append({"case": case.name, "rank": rank, "measured": measured, "predicted": want, "error": err,
                         "peak_rss_extra": rss_extra, "run": r, "baseline": b, "case_config": case.__dict__})
            print(f"{case.name:26s} {rank:4d} {measured / 2**20:12.1f} {want / 2**20:13.1f} {100 * err:+6.1f}% "
                  f"{rss_extra / 2**20:12.1f}", flush=True)
        if args.json:  # after every case: a long grid that stops half-way keeps what it measured
            Path(args.json).write_text(json.dumps(previous + rows, indent=1))
    print_summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
