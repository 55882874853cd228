"""The reduced CPU study behind tools/reproduce.py: plan the runs, train them, summarise each one.

A study is a list of *arms* (a label, a variant and its overrides), each trained with several
seeds: the main arms (the variants the paper's three findings compare) with `seeds`, the
sensitivity arms (the paper's open choices) with the first seed only. Every run is its own
`python train.py` subprocess, so a diverging run cannot take the study down; its summary reads
only the run's metrics.jsonl. study_report.py turns the summaries into report.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_entropy.analysis import plots
from megatron_entropy.model.entropy import entropy_bins

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "SM+LN+G"
EREG = "EReg(SM(t)+ScFuFFN)"
STUDY_VARIANTS = (BASELINE, "SM", "SM+ScFuFFN", EREG)


@dataclass(frozen=True)
class Arm:
    """One configuration of the study: `label` names it in the report (the variant for main arms)."""
    label: str
    variant: str
    overrides: tuple[str, ...] = ()
    note: str = ""  # what the sensitivity arm changes, for the report


@dataclass
class StudySettings:
    variants: tuple[str, ...]
    steps: int
    overrides: list[str] = field(default_factory=list)  # applied to every run (model size, data, ...)
    seeds: tuple[int, ...] = (1,)
    sensitivities: tuple[Arm, ...] = ()  # trained with seeds[0] only
    arm_overrides: dict = field(default_factory=dict)  # variant -> extra overrides of that main arm
    preset: str = "tiny"
    timeout_s: float = 3600.0
    jobs: int = 2  # runs in parallel, each with cpu_count // jobs threads

    def arms(self) -> list[Arm]:
        return [Arm(v, v, tuple(self.arm_overrides.get(v, ())), " ".join(self.arm_overrides.get(v, ())))
                for v in self.variants]


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    seed: int

    @property
    def name(self) -> str:
        return f"{slug(self.arm.label)}_seed{self.seed}"


def plan(settings: StudySettings) -> list[RunSpec]:
    """Main arms seed by seed (a study cut short still has every variant), then the sensitivities."""
    runs = [RunSpec(arm, seed) for seed in settings.seeds for arm in settings.arms()]
    return runs + [RunSpec(arm, settings.seeds[0]) for arm in settings.sensitivities]


def slug(label: str) -> str:
    """'EReg(SM(t)+ScFuFFN)' -> 'ereg_sm_t_scfuffn' (directory and file names)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def train_command(run: RunSpec, run_dir: Path, settings: StudySettings) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", settings.preset, "--model.variant", run.arm.variant,
            "--train.max_steps", str(settings.steps), "--train.seed", str(run.seed),
            "--logging.run_dir", str(run_dir), "--logging.wandb", "off", "--logging.progress_bar", "false",
            "--train.save_dir", "", *settings.overrides, *run.arm.overrides]


@dataclass
class RunOutcome:
    run: RunSpec
    run_dir: Path
    returncode: int
    wall_s: float
    command: list[str]


_RUNNING: set[subprocess.Popen] = set()  # training processes in flight, for stop_all


def stop_all() -> None:
    """Kill the training runs in flight (on Ctrl-C or SIGTERM), so none is left orphaned."""
    for process in list(_RUNNING):
        process.kill()


def run_one(run: RunSpec, out_dir: Path, settings: StudySettings, say=print) -> RunOutcome:
    run_dir = out_dir / "runs" / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(run, run_dir, settings)
    threads = str(max(1, (os.cpu_count() or 1) // max(settings.jobs, 1)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _RUNNING.add(process)
        try:
            returncode = process.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        finally:
            _RUNNING.discard(process)
    wall = time.perf_counter() - started
    say(f"{run.arm.label} seed {run.seed}: exit {returncode} in {wall:.0f}s ({run_dir / 'train.log'})")
    (run_dir / "study_run.json").write_text(json.dumps(
        {"label": run.arm.label, "variant": run.arm.variant, "seed": run.seed, "returncode": returncode,
         "wall_s": wall, "command": command}, indent=1))
    return RunOutcome(run, run_dir, returncode, wall, command)


def load_outcome(run: RunSpec, out_dir: Path) -> RunOutcome:
    """A finished run of an earlier study (for --report-only); a missing record reads as a crash."""
    run_dir = Path(out_dir) / "runs" / run.name
    try:
        saved = json.loads((run_dir / "study_run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return RunOutcome(run, run_dir, -1, float("nan"), [])
    return RunOutcome(run, run_dir, saved["returncode"], saved["wall_s"], saved["command"])


def run_all(out_dir: Path, settings: StudySettings, say=print) -> list[RunOutcome]:
    pool = ThreadPoolExecutor(max_workers=max(settings.jobs, 1))  # the threads only wait on processes
    try:
        return list(pool.map(lambda r: run_one(r, Path(out_dir), settings, say), plan(settings)))
    except BaseException:  # Ctrl-C or SIGTERM: kill the runs first, or shutdown would wait for them
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- one run's summary

def summarize_run(outcome: RunOutcome) -> dict:
    """The numbers the report needs from one run's metrics.jsonl (nan where the run wrote none).

    Bins are those of the paper's Fig. 2a with m = the model's largest head entropy; "early" is the
    first half of the layers, "deep" the rest. Overload = share of early-layer heads in the top
    bin [3m/4, m]; collapse = deep-layer mean entropy and share of deep heads in the bottom bin [0, m/4).
    """
    nan = float("nan")
    s = {"label": outcome.run.arm.label, "variant": outcome.run.arm.variant, "seed": outcome.run.seed,
         "returncode": outcome.returncode, "wall_s": outcome.wall_s, "val_ppl": nan, "val_loss": nan,
         "nan_total": 0.0, "nonfinite_loss": False, "early_entropy": nan, "deep_entropy": nan,
         "early_top_bin": nan, "deep_bottom_bin": nan, "top_bin": nan, "bottom_bin": nan, "alarms": {},
         "log_T": nan, "entropy": None, "curve": ([], []), "first_loss": nan, "max_loss_after_first": nan,
         "spikes": 0, "trajectory": ([], [])}
    try:
        records = plots.read_metrics(outcome.run_dir)
    except FileNotFoundError:
        return s
    final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
    if final and final.get("val_loss") is not None:
        s["val_loss"] = float(final["val_loss"])
        s["val_ppl"] = _safe_exp(s["val_loss"])
    train = plots.train_records(records)
    losses = [(r["step"], float(r["lm_loss"])) for r in train if r.get("lm_loss") is not None]
    s["curve"] = ([st for st, _ in losses], [v for _, v in losses])
    if losses:
        s["first_loss"] = losses[0][1]
        s["max_loss_after_first"] = max((v for _, v in losses[1:]), default=nan)
    temperatures = [r["temperature_mean"] for r in train if r.get("temperature_mean")]
    if temperatures:  # per-layer mean temperature at the first and last logged step (SM(t) variants)
        s["temperature_start"], s["temperature_end"] = temperatures[0], temperatures[-1]
    layer_means = [r for r in train if r.get("entropy_layer_mean")]
    s["trajectory"] = ([r["step"] for r in layer_means], [r["entropy_layer_mean"] for r in layer_means])
    s["nan_total"] = sum(float(v or 0) for r in train for v in r.get("nan_counts") or [])
    s["nonfinite_loss"] = any(not math.isfinite(float(r["loss"])) for r in train if r.get("loss") is not None)
    s["spikes"] = sum(1 for r in records if r.get("kind") == "spike")
    for alarm in (r for r in records if r.get("kind") == "alarm"):
        s["alarms"].setdefault(alarm["alarm"], alarm["step"])  # first step of each alarm kind
    if train and train[-1].get("log_T"):
        s["log_T"] = float(train[-1]["log_T"])
    last = plots.final_entropy_record(records)
    if last is not None:
        matrix = [[nan if v is None else float(v) for v in row] for row in last["entropy"]]
        s.update(entropy_summary(matrix))
    return s


def entropy_summary(matrix) -> dict:
    """Early/deep means and bin shares of one [L][H] entropy matrix (m = its largest entry)."""
    half = max(1, len(matrix) // 2)
    finite = [v for row in matrix for v in row if math.isfinite(v)]
    m = max(finite) if finite else None
    early, deep = matrix[:half], matrix[half:] or matrix
    bins = entropy_bins(matrix)
    return {"entropy": matrix, "early_entropy": _mean(v for row in early for v in row),
            "deep_entropy": _mean(v for row in deep for v in row),
            "early_top_bin": entropy_bins(early, m)[3] if m else float("nan"),
            "deep_bottom_bin": entropy_bins(deep, m)[0] if m else float("nan"),
            "bottom_bin": bins[0], "top_bin": bins[3]}


def unstable(s: dict) -> bool:
    return s["returncode"] != 0 or s["nan_total"] > 0 or s["nonfinite_loss"] or not math.isfinite(s["val_ppl"])


def loss_spiked(s: dict) -> bool:
    """A logged LM loss above the first logged one (the main job's health criterion)."""
    return math.isfinite(s["max_loss_after_first"]) and s["max_loss_after_first"] > s["first_loss"]


def _safe_exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) and x < 700 else float("nan")


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def quote(arg: str) -> str:
    return f"'{arg}'" if arg == "" or re.search(r"[()+ ]", arg) else arg


def settings_commands(out_dir: Path, settings: StudySettings) -> list[list[str]]:
    """The train.py commands as a user would type them from the repository root."""
    return [["python", "train.py", *train_command(r, out_dir / "runs" / r.name, settings)[2:]] for r in plan(settings)]
