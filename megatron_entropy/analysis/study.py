"""The reduced CPU study behind tools/reproduce.py: train a few variants, summarise, write report.md.

Each variant trains in its own `python train.py` subprocess (so a diverging run cannot take the
study down); the summary reads only the run's metrics.jsonl, and the "what we observed" text is
generated from those numbers, saying plainly where the small scale does not show the paper's effect.
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
STUDY_VARIANTS = ("SM+LN+G", "SM+LN+R", "SM", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)")
BASELINE = "SM+LN+G"

# Paper numbers the observations compare against (Table 3, Table 2, section 3).
PAPER_PPL_T128 = {"SM+LN+G": 2.69, "SM+LN+R": 2.76, "SM": float("nan"), "SM+ScFuFFN": 3.48, "EReg(SM(t)+ScFuFFN)": 3.21}


@dataclass
class StudySettings:
    variants: tuple[str, ...]
    steps: int
    overrides: list[str] = field(default_factory=list)  # applied to every run (model size, data, ...)
    preset: str = "tiny"
    timeout_s: float = 3600.0
    jobs: int = 2  # runs in parallel, each with cpu_count // jobs threads


# 6 layers (the tiny preset has 4) so there are "deep" layers to collapse. Two single-threaded runs
# side by side: ~0.33 s per step each on two idle cores, so 3 rounds x 1000 steps plus start-up
# and evaluation stay under 30 minutes. (Small models gain little from a second thread, and a
# 2-thread run collapses when the cores are shared: we measured 40x slowdowns.)
FULL = StudySettings(STUDY_VARIANTS, steps=1000,
                     overrides=["--model.num_layers", "6", "--train.eval_interval", "250", "--logging.log_interval", "25"])
SMOKE = StudySettings(("SM+LN+G", "EReg(SM(t)+ScFuFFN)"), steps=20,
                      overrides=["--model.num_layers", "2", "--model.hidden_size", "64", "--data.corpus_max_bytes", "300000",
                                 "--data.tokenizer_vocab_size", "512", "--train.eval_interval", "0"])


def slug(variant: str) -> str:
    """'EReg(SM(t)+ScFuFFN)' -> 'ereg_sm_t_scfuffn' (directory and file names)."""
    return re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def train_command(variant: str, run_dir: Path, settings: StudySettings) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", settings.preset, "--model.variant", variant,
            "--train.max_steps", str(settings.steps), "--logging.run_dir", str(run_dir),
            "--logging.wandb", "off", "--logging.progress_bar", "false", *settings.overrides]


@dataclass
class RunOutcome:
    variant: str
    run_dir: Path
    returncode: int
    wall_s: float
    command: list[str]


_RUNNING: set[subprocess.Popen] = set()  # training processes in flight, for stop_all


def stop_all() -> None:
    """Kill the training runs in flight (on Ctrl-C or SIGTERM), so none is left orphaned."""
    for process in list(_RUNNING):
        process.kill()


def run_variant(variant: str, out_dir: Path, settings: StudySettings, say=print) -> RunOutcome:
    run_dir = out_dir / "runs" / slug(variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(variant, run_dir, settings)
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
    say(f"{variant}: exit {returncode} in {wall:.0f}s ({run_dir / 'train.log'})")
    outcome = RunOutcome(variant, run_dir, returncode, wall, command)
    (run_dir / "study_run.json").write_text(json.dumps(
        {"variant": variant, "returncode": returncode, "wall_s": wall, "command": command}, indent=1))
    return outcome


def load_outcome(variant: str, out_dir: Path) -> RunOutcome:
    """A finished run of an earlier study (for --report-only); a missing record reads as a crash."""
    run_dir = Path(out_dir) / "runs" / slug(variant)
    try:
        saved = json.loads((run_dir / "study_run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return RunOutcome(variant, run_dir, -1, float("nan"), [])
    return RunOutcome(variant, run_dir, saved["returncode"], saved["wall_s"], saved["command"])


# ----------------------------------------------------------------------------- summaries

def summarize_run(outcome: RunOutcome, collapse_fraction: float = 0.1) -> dict:
    """The findings-table numbers of one run, read from its metrics.jsonl."""
    summary = {"variant": outcome.variant, "returncode": outcome.returncode, "wall_s": outcome.wall_s,
               "val_ppl": float("nan"), "val_loss": float("nan"), "nan_total": 0.0, "nonfinite_loss": False,
               "early_entropy": float("nan"), "deep_entropy": float("nan"), "top_bin": float("nan"),
               "bottom_bin": float("nan"), "alarms": {}, "log_T": float("nan"), "entropy": None, "curve": ([], [])}
    try:
        records = plots.read_metrics(outcome.run_dir)
    except FileNotFoundError:
        return summary
    final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
    if final and final.get("val_loss") is not None:
        summary["val_loss"] = float(final["val_loss"])
        summary["val_ppl"] = _safe_exp(summary["val_loss"])
    train = plots.train_records(records)
    temperatures = [r["temperature_mean"] for r in train if r.get("temperature_mean")]
    if temperatures:  # per-layer mean temperature at the first and last logged step (SM(t) variants)
        summary["temperature_start"], summary["temperature_end"] = temperatures[0], temperatures[-1]
    summary["curve"] = ([r["step"] for r in train if "lm_loss" in r], [r["lm_loss"] for r in train if "lm_loss" in r])
    summary["nan_total"] = sum(float(v or 0) for r in train for v in r.get("nan_counts") or [])
    summary["nonfinite_loss"] = any(not math.isfinite(float(r["loss"])) for r in train if r.get("loss") is not None)
    for alarm in (r for r in records if r.get("kind") == "alarm"):
        summary["alarms"].setdefault(alarm["alarm"], alarm["step"])  # first step of each alarm kind
    if train and train[-1].get("log_T"):
        summary["log_T"] = float(train[-1]["log_T"])
    last = plots.final_entropy_record(records)
    if last is not None:
        matrix = [[float("nan") if v is None else float(v) for v in row] for row in last["entropy"]]
        half = max(1, len(matrix) // 2)
        summary["entropy"] = matrix
        summary["early_entropy"] = _mean(v for row in matrix[:half] for v in row)
        summary["deep_entropy"] = _mean(v for row in matrix[half:] for v in row)
        bins = entropy_bins(matrix)
        summary["bottom_bin"], summary["top_bin"] = bins[0], bins[3]
        summary["collapse_threshold"] = collapse_fraction * summary["log_T"]
    return summary


def unstable(s: dict) -> bool:
    return s["returncode"] != 0 or s["nan_total"] > 0 or s["nonfinite_loss"] or not math.isfinite(s["val_ppl"])


def _safe_exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) and x < 700 else float("nan")


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# ----------------------------------------------------------------------------- report

def findings_table(summaries: list[dict]) -> list[str]:
    lines = ["| variant | final val PPL | paper PPL (T=128, GPT-2) | NaN / instability | mean entropy early layers | "
             "mean entropy deep layers | overloaded heads (top bin) | collapsed heads (bottom bin) | alarms | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        paper = PAPER_PPL_T128.get(s["variant"])
        paper_text = "-" if paper is None else ("NaNs" if math.isnan(paper) else f"{paper:.2f}")
        status = "crashed" if s["returncode"] != 0 else (
            f"{s['nan_total']:g} NaNs" if s["nan_total"] else ("non-finite loss" if s["nonfinite_loss"] else "stable"))
        alarms = ", ".join(f"{k.replace('_', ' ')} @{v}" for k, v in s["alarms"].items()) or "none"
        lines.append(f"| {s['variant']} | {_fmt(s['val_ppl'])} | {paper_text} | {status} | {_fmt(s['early_entropy'])} | "
                     f"{_fmt(s['deep_entropy'])} | {_pct(s['top_bin'])} | {_pct(s['bottom_bin'])} | {alarms} | "
                     f"{_fmt(s['wall_s'], '.0f')}s |")
    return lines


def observations(summaries: list[dict]) -> list[str]:
    """Sentences generated from the numbers; each says whether the paper's effect shows here."""
    by = {s["variant"]: s for s in summaries}
    return [*_perplexity_sentences(summaries, by.get(BASELINE)), *_stability_sentences(summaries),
            *_collapse_sentences(summaries), *_overload_sentences(summaries, by.get(BASELINE)),
            *_entropy_guidance_sentences(by.get("SM+ScFuFFN"), by.get("EReg(SM(t)+ScFuFFN)")),
            "Scale caveat: these are CPU-sized models trained for minutes on the embedded corpus, not GPT-2 small "
            "on 2.1B CodeParrot tokens; perplexities are not comparable to the paper's, only the direction of "
            "effects is, and effects that need depth or long training may be absent."]


def _perplexity_sentences(summaries, base) -> list[str]:
    if not base or not math.isfinite(base["val_ppl"]):
        return []
    out = []
    for s in summaries:
        if s is base or not math.isfinite(s["val_ppl"]):
            continue
        delta = 100 * (s["val_ppl"] / base["val_ppl"] - 1)
        paper = PAPER_PPL_T128.get(s["variant"])
        paper_delta = "" if paper is None or math.isnan(paper) else f" (paper: {100 * (paper / 2.69 - 1):+.1f}%)"
        out.append(f"{s['variant']} reaches validation perplexity {s['val_ppl']:.2f}, {delta:+.1f}% vs {BASELINE}{paper_delta}.")
    return out


def _stability_sentences(summaries) -> list[str]:
    out = [f"{s['variant']} became unstable (NaNs, a non-finite loss or a crash)"
           + (", as the paper's SM does (Table 2)." if s["variant"] == "SM" else ".")
           for s in summaries if unstable(s)]
    if any(s["variant"] == "SM" and not unstable(s) for s in summaries):
        out.append("The Softmax-only model (SM) trained without NaNs here; the paper's SM diverges in a 12-layer model "
                   "over ~32K steps at lr 1e-3, far beyond this study's depth and length.")
    return out


def _collapse_sentences(summaries) -> list[str]:
    out = []
    for s in summaries:
        if not (math.isfinite(s["deep_entropy"]) and math.isfinite(s["early_entropy"])):
            continue
        head = (f"{s['variant']}: mean head entropy {s['early_entropy']:.2f} in the early layers vs "
                f"{s['deep_entropy']:.2f} in the deep layers")
        if s["deep_entropy"] < s.get("collapse_threshold", 0.0) or s["bottom_bin"] >= 0.25:
            text = f"{head}, {_pct(s['bottom_bin'])} of heads in the bottom bin: the deep layers collapsed"
            start, end = s.get("temperature_start"), s.get("temperature_end")
            if start and end:
                text += (f". Its deepest layer's mean temperature went from {start[-1]:.3g} to {end[-1]:.3g}: logits "
                         f"divided by t ~ {start[-1]:.2g} start ~{1 / start[-1]:.0f}x sharper than standard attention "
                         f"(the paper's init, ambiguity A1), and this short run does not undo that")
            out.append(text + ".")
        elif s["variant"] == "SM":
            lower = s["deep_entropy"] < 0.75 * s["early_entropy"]
            out.append(head + ("; lower in depth, the direction of the paper's entropy collapse, but not ~0 as in its "
                               "Fig. 3f." if lower else "; no entropy collapse is visible at this scale (paper Fig. 3f: "
                               "deep layers ~0.04-0.2)."))
    return out


def _overload_sentences(summaries, base) -> list[str]:
    ln_free = [s for s in summaries if not s["variant"].startswith("SM+LN") and math.isfinite(s["top_bin"])]
    if not base or not math.isfinite(base["top_bin"]) or not ln_free:
        return []
    worst = max(ln_free, key=lambda s: s["top_bin"])
    text = (f"Entropic overload: {_pct(base['top_bin'])} of {BASELINE}'s heads are in the top entropy bin vs "
            f"{_pct(worst['top_bin'])} for {worst['variant']}; ")
    if worst["top_bin"] > base["top_bin"] + 0.1:
        text += "the LN-free model has the larger share, as in the paper (SM 45%)"
    else:
        text += "no clear overload of the LN-free models relative to the baseline at this scale"
    if base["top_bin"] > 0.5:
        text += (f", but the baseline itself has {_pct(base['top_bin'])} there (the paper's baselines keep ~90% of heads "
                 "in the two middle bins): the heads have not specialised yet, so the comparison is weak")
    return [text + "."]


def _entropy_guidance_sentences(fused, ereg) -> list[str]:
    if not (fused and ereg and math.isfinite(fused["val_ppl"]) and math.isfinite(ereg["val_ppl"])):
        return []
    gain = 100 * (1 - ereg["val_ppl"] / fused["val_ppl"])
    return [f"Entropy-guided attention: EReg(SM(t)+ScFuFFN) {ereg['val_ppl']:.2f} vs SM+ScFuFFN {fused['val_ppl']:.2f} "
            f"({gain:+.1f}% better; paper: +7.8%). " +
            ("The paper's improvement shows here." if gain > 1 else
             "The paper's improvement does not show at this scale and training length.")]


def write_report(out_dir: Path, summaries: list[dict], settings: StudySettings, total_s: float | None) -> Path:
    """report.md; total_s is the study's wall time (None: rewritten later, so only run times are known)."""
    out_dir = Path(out_dir)
    run_total = sum(s["wall_s"] for s in summaries if math.isfinite(s["wall_s"]))
    timing = (f"total wall time {total_s:.0f}s" if total_s is not None else
              f"the runs took {run_total:.0f}s in all (report rewritten from the finished runs)")
    figures = out_dir / "figures"
    lines = ["# Reduced reproduction study", "",
             f"{len(summaries)} variants, {settings.steps} steps each, preset `{settings.preset}` with overrides "
             f"`{' '.join(settings.overrides) or '(none)'}`, {settings.jobs} run(s) at a time on {os.cpu_count()} "
             f"CPU(s); {timing}. Entropies are per-head "
             "means over query positions on the validation data of the final model; bins are relative to the "
             "model's largest head entropy m (paper Fig. 2a): top = [3m/4, m], bottom = [0, m/4); early layers = "
             "first half of the layers, deep = the rest.", "", "## Findings", "", *findings_table(summaries), "",
             "## What we observed", "", *[f"- {o}" for o in observations(summaries)], "", "## Figures", ""]
    with_entropy = [s for s in summaries if s["entropy"]]
    if with_entropy:
        bins_path = plots.save_bins_comparison({s["variant"]: entropy_bins(s["entropy"]) for s in with_entropy},
                                               figures / "entropy_bins.png")
        lines += [f"![entropy-range histogram]({bins_path.relative_to(out_dir)})", ""]
    if any(s["curve"][0] for s in summaries):
        loss_path = plots.save_loss_comparison({s["variant"]: s["curve"] for s in summaries if s["curve"][0]},
                                               figures / "train_loss.png", title="training LM loss")
        lines += [f"![training loss]({loss_path.relative_to(out_dir)})", ""]
    vmax = max((v for s in with_entropy for row in s["entropy"] for v in row if math.isfinite(v)), default=None)
    for s in with_entropy:
        path = plots.save_entropy_heatmap(s["entropy"], figures / f"heatmap_{slug(s['variant'])}.png",
                                          title=f"{s['variant']}: per-head entropy (final, validation)", vmax=vmax)
        lines += [f"### {s['variant']}", "", f"![{s['variant']} heatmap]({path.relative_to(out_dir)})", "",
                  f"Run directory: `runs/{slug(s['variant'])}` (all figures in its `figures/`, log in `train.log`).", ""]
    lines += ["## Commands", "", "```", *(" ".join(_quote(a) for a in cmd) for cmd in settings_commands(out_dir, settings)),
              "```", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def settings_commands(out_dir: Path, settings: StudySettings) -> list[list[str]]:
    """The train.py commands as a user would type them from the repository root."""
    return [["python", "train.py", *train_command(v, out_dir / "runs" / slug(v), settings)[2:]]
            for v in settings.variants]


def report_only(out_dir: Path, settings: StudySettings) -> Path:
    """Rewrite report.md from the runs already in out_dir/runs (nothing is trained)."""
    outcomes = [load_outcome(v, out_dir) for v in settings.variants]
    return write_report(Path(out_dir), [summarize_run(o) for o in outcomes], settings, None)


def run_study(out_dir: Path, settings: StudySettings, say=print) -> Path:
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(settings.jobs, 1))  # the threads only wait on processes
    try:
        outcomes = list(pool.map(lambda v: run_variant(v, Path(out_dir), settings, say), settings.variants))
    except BaseException:  # Ctrl-C or SIGTERM: kill the runs first, or shutdown would wait for them
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summaries = [summarize_run(o) for o in outcomes]
    return write_report(Path(out_dir), summaries, settings, time.perf_counter() - started)


def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def _quote(arg: str) -> str:
    return f"'{arg}'" if re.search(r"[()+ ]", arg) else arg
