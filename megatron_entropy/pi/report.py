"""The Markdown report of `tools/pi_measure.py --study` (pure Python: reads the study's JSON)."""

from __future__ import annotations

from pathlib import Path

from megatron_entropy.analysis import pi_measured

BASELINE = "SM+LN+G"
# The paper's Table 3 savings against SM+LN+G (GPT-2 small, T = 128; BumbleBee, 100 Mbps / 80 ms).
PAPER_TABLE3 = {"SM+LN+G": (1.0, 1.0), "SM+LN+R": (25.32 / 9.44, 8.21 / 6.06),
                "SM+ScFuFFN": (25.32 / 6.43, 8.21 / 4.76), "EReg(SM(t)+ScFuFFN)": (25.32 / 6.43, 8.21 / 4.76)}
GROUP_ORDER = ("matmul", "softmax", "layernorm", "gelu/relu", "embedding/head", "setup")


def _shape_key(r: dict) -> tuple:
    a = r["arch"]
    return a["num_layers"], a["hidden_size"], r["seq_length"]


def _groups(r: dict) -> dict[str, float]:
    out = dict.fromkeys(GROUP_ORDER, 0.0)
    for cls, c in r["by_class"].items():
        out[pi_measured.GROUPS[cls]] += c["bytes"]
    return out


def measured_table(results: list[dict]) -> list[str]:
    lines = ["| L | d | T | variant | comm MB | send actions | compute s | latency s (model) | latency s, no setup | "
             "comm saving | lat saving | paper T3 comm / lat | max logit err (rel) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_shape.setdefault(_shape_key(r), {})[r["variant"]] = r
    for key in sorted(by_shape):
        runs = by_shape[key]
        base = runs.get(BASELINE)
        for variant in sorted(runs, key=lambda v: list(PAPER_TABLE3).index(v) if v in PAPER_TABLE3 else 99):
            r = runs[variant]
            t = r["total"]
            no_setup = _latency_without_setup(r)
            if base:
                comm_save = f"{base['total']['bytes'] / t['bytes']:.2f}x"
                lat_save = f"{base['total']['latency_s'] / t['latency_s']:.2f}x"
            else:
                comm_save = lat_save = "-"
            paper = PAPER_TABLE3.get(variant)
            paper_s = f"{paper[0]:.2f}x / {paper[1]:.2f}x" if paper else "-"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {variant} | {t['bytes'] / 1e6:.2f} | {t['actions']} | "
                         f"{t['seconds']:.1f} | {t['latency_s']:.0f} | {no_setup:.0f} | {comm_save} | {lat_save} | "
                         f"{paper_s} | {r['error']['max_rel']:.1e} |")
    return lines


def _latency_without_setup(r: dict) -> float:
    t, s = r["total"], r["by_class"].get("setup", {"bytes": 0, "actions": 0, "seconds": 0.0})
    n = r["network"]
    return pi_measured.latency(t["bytes"] - s["bytes"], t["actions"] - s["actions"], t["seconds"] - s["seconds"],
                               n["bandwidth_mbps"] * 1e6, n["rtt_ms"] / 1e3)


def breakdown_table(results: list[dict]) -> list[str]:
    lines = ["| L | d | T | variant | " + " | ".join(f"{g} MB" for g in GROUP_ORDER) + " |",
             "|---|---|---|---|" + "---|" * len(GROUP_ORDER)]
    for r in sorted(results, key=lambda r: (_shape_key(r), r["variant"])):
        g = _groups(r)
        lines.append(f"| {' | '.join(map(str, _shape_key(r)))} | {r['variant']} | "
                     + " | ".join(f"{g[k] / 1e6:.2f}" for k in GROUP_ORDER) + " |")
    return lines


def fit_quality(doc: dict) -> list[str]:
    """Each run's total re-estimated from the fitted coefficients (in-sample)."""
    model = doc["coefficients"]
    lines = ["| L | d | T | variant | comm MB measured | fitted | err | send actions measured | fitted | err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    errs = {"bytes": [], "actions": []}
    for r in sorted(doc["measurements"], key=lambda r: (_shape_key(r), r["variant"])):
        arch = pi_measured.Arch(**r["arch"])
        est = pi_measured.estimate(model, arch, r["seq_length"])["total"]
        row = []
        for metric in ("bytes", "actions"):
            e = est[metric] / r["total"][metric] - 1
            errs[metric].append(abs(e))
            scale = 1e6 if metric == "bytes" else 1
            row.append(f"{r['total'][metric] / scale:.2f} | {est[metric] / scale:.2f} | {100 * e:+.1f}%")
        lines.append(f"| {' | '.join(map(str, _shape_key(r)))} | {r['variant']} | {' | '.join(row)} |")
    summary = (f"In-sample |error| of the run totals: comm mean {100 * sum(errs['bytes']) / len(errs['bytes']):.1f}% "
               f"max {100 * max(errs['bytes']):.1f}%; send actions mean "
               f"{100 * sum(errs['actions']) / len(errs['actions']):.1f}% max {100 * max(errs['actions']):.1f}%.")
    return lines + ["", summary]


def coefficient_table(model: dict) -> list[str]:
    lines = ["| class | bytes per unit | send actions per unit | seconds per unit |", "|---|---|---|---|"]
    for key in sorted(model):
        cells = []
        for metric in ("bytes", "actions", "seconds"):
            cells.append(", ".join(f"{n} {v:.3g}" for n, v in model[key][metric].items() if v > 0) or "0")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def write_report(doc: dict, path: Path) -> None:
    results = doc["measurements"]
    n = doc["network"]
    text = [
        "# Private-inference cost, measured (tools/pi_measure.py --study)", "",
        f"Protocol {doc['protocol'].upper()} (SPU 0.9.5, two parties simulated in one process), ring FM64, "
        f"18 fraction bits, exp {doc['exp_mode']}, GELU form {doc.get('gelu_form', 'sigmoid')}; one output token "
        f"given T input tokens; vocabulary {results[0]['arch']['vocab_size'] if results else '-'}, H = "
        f"{results[0]['arch']['num_heads'] if results else '-'}. Latency model: compute (this machine, both "
        f"parties on the same cores) + bytes / {n['bandwidth_mbps']:g} Mbps + send actions x {n['rtt_ms']:g} ms. "
        f"{len(results)} runs in {doc['wall_min']:.1f} min"
        + (f"; {len(doc['skipped'])} runs skipped by the time budget." if doc["skipped"] else "."), "",
        "## Measured totals and savings against SM+LN+G", "", *measured_table(results), "",
        "## Communication by operation group", "", *breakdown_table(results), "",
        "## Fitted per-operation costs (analysis/pi_measured.py)", "", *coefficient_table(doc["coefficients"]), "",
        *fit_quality(doc), "",
    ]
    path.write_text("\n".join(text) + "\n")
