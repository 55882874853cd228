"""report.md of the reduced study: per-finding verdicts with seed intervals, tables, figures.

The three findings of the paper tested here, each from the main arms' seeds:
- collapse: the Softmax-only model's (SM) deep layers lose entropy (paper Fig. 3f: ~0.04-0.2 nats);
  compared with the baseline SM+LN+G's deep layers, plus SM's share of deep heads in the bottom bin;
- overload: LN-free models keep most early-layer heads in the top entropy bin (paper Fig. 2a);
  compared with the baseline's early layers;
- entropy guidance: EReg(SM(t)+ScFuFFN) reaches a lower validation perplexity than SM+ScFuFFN
  (paper Table 3: 3.21 vs 3.48, 7.8 %).
Verdicts follow fixed rules stated in `VERDICT_RULES`, so the text cannot drift from the numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from megatron_entropy.analysis import plots, stats
from megatron_entropy.analysis.study import BASELINE, EREG, StudySettings, loss_spiked, quote, settings_commands, \
    slug, unstable
from megatron_entropy.model.entropy import entropy_bins

FUSED = "SM+ScFuFFN"
VERDICT_RULES = (
    "collapse: *reproduced* if SM's deep layers have significantly lower mean entropy than SM+LN+G's "
    "(Welch p < 0.05) and >= 25 % of SM's deep heads are in the bottom bin (or SM diverges); *partly* if only "
    "the first holds; else *not reproduced*. "
    "Overload: *reproduced* if SM's early-layer top-bin share is significantly above SM+LN+G's and the "
    "baseline's is <= 50 %; *partly* if above but the baseline also has > 50 % there (heads not yet "
    "specialised) or only the early-layer mean entropy is significantly higher; else *not reproduced*. "
    "Entropy guidance: *reproduced* if EReg's validation loss is significantly below SM+ScFuFFN's; *partly* "
    "if lower but not significantly; else *not reproduced*.")


MISSING = "needs both compared arms; this study did not train them"


def group(summaries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in summaries:
        out.setdefault(s["label"], []).append(s)
    return out


def values(runs: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in runs]


def interval(runs: list[dict], key: str) -> stats.Interval:
    return stats.mean_interval(values(runs, key))


# ----------------------------------------------------------------------------- the three findings

def collapse_finding(by: dict) -> dict:
    sm, base = by.get("SM"), by.get(BASELINE)
    if not sm or not base:
        return {"name": "SM entropy collapse in deep layers", "verdict": "not tested", "lines": [MISSING]}
    diff = stats.welch(values(sm, "deep_entropy"), values(base, "deep_entropy"))
    bottom = interval(sm, "deep_bottom_bin")
    diverged = all(unstable(r) for r in sm)
    lower = diff.significant and diff.difference < 0
    verdict = ("reproduced" if lower and (bottom.mean >= 0.25 or diverged) else "partly" if lower else "not reproduced")
    lines = [f"SM deep-layer mean entropy {interval(sm, 'deep_entropy').format()} nats vs SM+LN+G "
             f"{interval(base, 'deep_entropy').format()}: difference {diff.format()} (paper Fig. 3f: SM's deep "
             "layers at ~0.04-0.2 nats)",
             f"SM deep heads in the bottom bin [0, m/4): {bottom.format('.0f', 100, '%')} (SM+LN+G "
             f"{interval(base, 'deep_bottom_bin').format('.0f', 100, '%')}); SM runs with NaNs: "
             f"{sum(unstable(r) for r in sm)}/{len(sm)}"]
    return {"name": "SM entropy collapse in deep layers", "verdict": verdict, "lines": lines, "effect": diff}


def overload_finding(by: dict) -> dict:
    sm, base = by.get("SM"), by.get(BASELINE)
    if not sm or not base:
        return {"name": "entropic overload in early layers", "verdict": "not tested", "lines": [MISSING]}
    share = stats.welch(values(sm, "early_top_bin"), values(base, "early_top_bin"))
    mean = stats.welch(values(sm, "early_entropy"), values(base, "early_entropy"))
    base_share = interval(base, "early_top_bin")
    above = share.significant and share.difference > 0
    if above and base_share.mean <= 0.5:
        verdict = "reproduced"
    elif above or (mean.significant and mean.difference > 0):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    lines = [f"early-layer heads in the top bin [3m/4, m]: SM {interval(sm, 'early_top_bin').format('.0f', 100, '%')}"
             f" vs SM+LN+G {base_share.format('.0f', 100, '%')}: difference {share.format('.0f', 100, ' pp')}",
             f"early-layer mean entropy: SM {interval(sm, 'early_entropy').format()} vs SM+LN+G "
             f"{interval(base, 'early_entropy').format()} nats: difference {mean.format()}"]
    if FUSED in by:
        lines.append(f"SM+ScFuFFN early-layer top-bin share {interval(by[FUSED], 'early_top_bin').format('.0f', 100, '%')}")
    return {"name": "entropic overload in early layers", "verdict": verdict, "lines": lines, "effect": share}


def guidance_finding(by: dict) -> dict:
    ereg, fused = by.get(EREG), by.get(FUSED)
    if not ereg or not fused:
        return {"name": "EReg gain over SM+ScFuFFN", "verdict": "not tested", "lines": [MISSING]}
    diff = stats.welch(values(ereg, "val_loss"), values(fused, "val_loss"))  # log-PPL difference
    better = math.isfinite(diff.difference) and diff.difference < 0
    verdict = "reproduced" if better and diff.significant else "partly" if better else "not reproduced"
    gain = _gain_text(diff)
    lines = [f"validation PPL: EReg {interval(ereg, 'val_ppl').format()} vs SM+ScFuFFN "
             f"{interval(fused, 'val_ppl').format()}; EReg better by {gain} (paper Table 3: 7.8 %)",
             f"validation loss difference {diff.format('.3f')} nats"]
    return {"name": "EReg gain over SM+ScFuFFN", "verdict": verdict, "lines": lines, "effect": diff}


def _gain_text(diff: stats.Comparison) -> str:
    """1 - PPL_a / PPL_b from a loss difference, with the interval carried through exp."""
    if not math.isfinite(diff.difference):
        return "n/a"
    gain = 100 * (1 - math.exp(diff.difference))
    if not math.isfinite(diff.half_width):
        return f"{gain:.1f} %"
    low, high = 100 * (1 - math.exp(diff.difference + diff.half_width)), 100 * (1 - math.exp(diff.difference - diff.half_width))
    return f"{gain:.1f} % (95 % interval {low:.1f} to {high:.1f} %)"


def findings(by: dict) -> list[dict]:
    return [collapse_finding(by), overload_finding(by), guidance_finding(by)]


# ----------------------------------------------------------------------------- tables

def main_table(by: dict, labels) -> list[str]:
    lines = ["| arm | seeds | val PPL | early top-bin share | early mean entropy | deep mean entropy | deep bottom-bin "
             "share | runs with NaNs | runs whose loss rose above its first value | collapse alarms | time per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        runs = by.get(label)
        if not runs:
            continue
        lines.append(
            f"| {label} | {len(runs)} | {interval(runs, 'val_ppl').format()} | "
            f"{interval(runs, 'early_top_bin').format('.0f', 100, '%')} | {interval(runs, 'early_entropy').format()} | "
            f"{interval(runs, 'deep_entropy').format()} | {interval(runs, 'deep_bottom_bin').format('.0f', 100, '%')} | "
            f"{sum(unstable(r) for r in runs)} | {sum(loss_spiked(r) for r in runs)} | "
            f"{sum('entropy_collapse' in r['alarms'] for r in runs)} | {interval(runs, 'wall_s').format('.0f')} s |")
    return lines


def sensitivity_table(by: dict, settings: StudySettings) -> list[str]:
    if not settings.sensitivities:
        return []
    reference = by.get(EREG, [])
    lines = ["| arm (1 seed) | what changes | val PPL | deep mean entropy | deep bottom-bin share | early top-bin share "
             "| loss above first value | collapse alarm | final mean t (deepest layer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [(EREG + f" (main arm, seed {reference[0]['seed']})", "-", reference[0])] if reference else []
    rows += [(a.label, a.note or " ".join(a.overrides), by[a.label][0]) for a in settings.sensitivities if by.get(a.label)]
    for label, note, r in rows:
        t_end = r.get("temperature_end")
        lines.append(f"| {label} | {note} | {_fmt(r['val_ppl'])} | {_fmt(r['deep_entropy'])} | {_pct(r['deep_bottom_bin'])} | "
                     f"{_pct(r['early_top_bin'])} | {'yes' if loss_spiked(r) else 'no'} | "
                     f"{'@' + str(r['alarms']['entropy_collapse']) if 'entropy_collapse' in r['alarms'] else 'no'} | "
                     f"{format(t_end[-1], '.3g') if t_end else '-'} |")
    return lines


# ----------------------------------------------------------------------------- the report

def write_report(out_dir: Path, summaries: list[dict], settings: StudySettings, total_s: float | None,
                 missing: list[str] = ()) -> Path:
    """report.md; total_s is the study's wall time (None: rewritten later from finished runs);
    `missing` names planned runs that never finished (a study cut short), said at the top."""
    out_dir = Path(out_dir)
    by = group(summaries)
    run_total = sum(s["wall_s"] for s in summaries if math.isfinite(s["wall_s"]))
    timing = (f"total wall time {total_s:.0f} s ({total_s / 60:.1f} min)" if total_s is not None else
              f"the runs took {run_total:.0f} s in all (report rewritten from the finished runs)")
    labels = [v for v in settings.variants]
    lines = ["# Reduced reproduction study", "",
             f"{len(settings.variants)} main arms x {len(settings.seeds)} seeds ({', '.join(map(str, settings.seeds))}) "
             f"and {len(settings.sensitivities)} single-seed sensitivity arms, {settings.steps} steps each, preset "
             f"`{settings.preset}` with overrides `{' '.join(settings.overrides) or '(none)'}`; {settings.jobs} run(s) at "
             f"a time on {os.cpu_count()} CPU(s); {timing}.", "",
             "Entropies are per-head means over query positions on the validation data of the final model. Bins are "
             "relative to the model's largest head entropy m (paper Fig. 2a): top = [3m/4, m], bottom = [0, m/4). "
             "Early layers = the first half, deep = the rest. Intervals: mean ± 95 % t-interval over seeds; "
             "differences: Welch's t-test.", ""]
    if missing:
        lines += [f"**Incomplete: {len(summaries)} of {len(summaries) + len(missing)} planned runs finished**; not run: "
                  f"{', '.join(missing)}. Arms with fewer than 2 seeds have no interval.", ""]
    lines += ["## Findings", ""]
    for f in findings(by):
        lines += [f"### {f['name']}: **{f['verdict']}**", "", *[f"- {line}" for line in f["lines"]], ""]
    lines += [f"Rules: {VERDICT_RULES}", "", "## Main comparison", "", *main_table(by, labels), ""]
    if settings.sensitivities:
        lines += ["## Sensitivities (the paper's open choices, one seed each)", "", *sensitivity_table(by, settings), ""]
    lines += ["## Figures", "", *figures(out_dir, by, labels)]
    lines += ["## Commands", "", "```", *(" ".join(quote(a) for a in cmd) for cmd in settings_commands(out_dir, settings)),
              "```", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def figures(out_dir: Path, by: dict, labels) -> list[str]:
    fig_dir, lines = out_dir / "figures", []
    first = {label: by[label][0] for label in labels if by.get(label)}  # the first seed of each main arm
    with_entropy = {k: s for k, s in first.items() if s["entropy"]}
    if with_entropy:
        path = plots.save_bins_comparison({k: entropy_bins(s["entropy"]) for k, s in with_entropy.items()},
                                          fig_dir / "entropy_bins.png", title="entropy-range histogram (first seed)")
        lines += [f"![entropy-range histogram]({path.relative_to(out_dir)})", ""]
    trajectories = {k: [r["trajectory"] for r in by[k] if r["trajectory"][0]] for k in labels if by.get(k)}
    if any(trajectories.values()):
        path = plots.save_depth_entropy_trajectories(trajectories, fig_dir / "entropy_trajectories.png")
        lines += [f"![early and deep layer entropy over steps]({path.relative_to(out_dir)})", ""]
    curves = {k: s["curve"] for k, s in first.items() if s["curve"][0]}
    if curves:
        path = plots.save_loss_comparison(curves, fig_dir / "train_loss.png", title="training LM loss (first seed)")
        lines += [f"![training loss]({path.relative_to(out_dir)})", ""]
    vmax = max((v for s in with_entropy.values() for row in s["entropy"] for v in row if math.isfinite(v)), default=None)
    for label, s in with_entropy.items():
        path = plots.save_entropy_heatmap(s["entropy"], fig_dir / f"heatmap_{slug(label)}.png",
                                          title=f"{label}: per-head entropy (final, validation, seed {s['seed']})", vmax=vmax)
        lines += [f"![{label} heatmap]({path.relative_to(out_dir)})", ""]
    return lines


def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"
