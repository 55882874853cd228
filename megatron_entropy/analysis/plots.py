"""Entropy figures (PNG) from a run's metrics.jsonl, after the paper's Figs. 2a, 3, 5 and 6.

Matplotlib is imported lazily and used through `matplotlib.figure.Figure` with the Agg canvas (no
pyplot global state), so importing this module costs nothing in the training loop and drawing is
safe from any thread. Every figure has a fixed pixel size (`FIGSIZE` x `DPI`, heatmaps grow with
the grid: `heatmap_figsize`), which the tests check.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DPI = 100
FIGSIZE = (8.0, 5.0)  # inches, every figure except the heatmaps
BIN_LABELS = ("[0, m/4)", "[m/4, m/2)", "[m/2, 3m/4)", "[3m/4, m]")


# ----------------------------------------------------------------------------- reading

def read_metrics(run_dir) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl; a torn last line (run still writing) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by train.py")
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def train_records(records, key: str | None = None) -> list[dict]:
    """Train records in step order, optionally only those that carry `key`."""
    rows = [r for r in records if r.get("kind") == "train" and (key is None or r.get(key) is not None)]
    return sorted(rows, key=lambda r: r.get("step", 0))


def final_entropy_record(records) -> dict | None:
    """The last record with an entropy matrix: the final (validation) one if the run finished,
    else the latest train record (the paper's Fig. 3 shows the fully trained model)."""
    rows = [r for r in records if r.get("kind") in ("train", "final") and r.get("entropy") is not None]
    return rows[-1] if rows else None


def last_with(records, key: str) -> dict | None:
    rows = train_records(records, key)
    return rows[-1] if rows else None


# ----------------------------------------------------------------------------- drawing helpers

def _figure(figsize=FIGSIZE):
    from matplotlib.figure import Figure  # lazy: keeps `import plots` free of matplotlib

    return Figure(figsize=figsize, dpi=DPI)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": keep the pixel size fixed
    return path


def heatmap_figsize(num_layers: int, num_heads: int, side_panels: int = 0) -> tuple[float, float]:
    """Inches for an L x H annotated heatmap: room for 2-decimal labels, capped at 16 x 12."""
    width = min(16.0, max(6.0, 1.6 + 0.62 * num_heads) + 2.2 * side_panels)
    height = min(12.0, max(4.0, 1.4 + 0.42 * num_layers))
    return (round(width, 2), round(height, 2))


def _matrix(matrix) -> list[list[float]]:
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    return [[float("nan") if v is None else float(v) for v in row] for row in matrix]


def _draw_heatmap(fig, ax, rows, vmax, cmap, fmt="{:.2f}", colorbar_label="entropy (nats)"):
    L, H = len(rows), len(rows[0]) if rows else 0
    finite = [v for row in rows for v in row if not math.isnan(v)]
    vmax = vmax if vmax is not None else (max(finite) if finite else 1.0)
    image = ax.imshow(rows, cmap=cmap, vmin=0.0, vmax=vmax or 1.0, aspect="auto")
    fontsize = max(5.0, min(9.0, 110.0 / max(H, L, 1)))
    for layer, row in enumerate(rows):
        for head, value in enumerate(row):
            text = "nan" if math.isnan(value) else fmt.format(value)
            dark = not math.isnan(value) and value < 0.55 * (vmax or 1.0)
            ax.text(head, layer, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.046, pad=0.03)


# ----------------------------------------------------------------------------- figures

def save_entropy_heatmap(matrix, path, title=None, vmax=None) -> Path:
    """Layer x head mean-entropy heatmap with each value printed (paper Fig. 3)."""
    rows = _matrix(matrix)
    fig = _figure(heatmap_figsize(len(rows), len(rows[0]) if rows else 1))
    ax = fig.subplots()
    _draw_heatmap(fig, ax, rows, vmax, "viridis")
    ax.set_title(title or "per-head attention entropy")
    fig.tight_layout()
    return _save(fig, path)


def save_layer_entropy_curves(records, path, log_t=None) -> Path:
    """Layer-wise mean entropy vs training steps (paper Fig. 5), with log T and the collapse line."""
    import matplotlib

    rows = train_records(records, "entropy_layer_mean")
    steps = [r["step"] for r in rows]
    layers = len(rows[0]["entropy_layer_mean"]) if rows else 0
    colors = matplotlib.colormaps["viridis"]
    fig = _figure()
    ax = fig.subplots()
    for layer in range(layers):
        values = [_float(r["entropy_layer_mean"][layer]) for r in rows]
        ax.plot(steps, values, color=colors(layer / max(layers - 1, 1)), label=f"layer {layer}")
    log_t = log_t if log_t is not None else (rows[-1].get("log_T") if rows else None)
    if log_t:
        ax.axhline(log_t, color="gray", linestyle="--", linewidth=1, label="log T")
    ax.set_xlabel("step")
    ax.set_ylabel("mean head entropy (nats)")
    ax.set_title("layer-wise mean attention entropy")
    ax.legend(fontsize=7, ncol=2 if layers > 8 else 1, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def save_entropy_bins(bins, path, title=None) -> Path:
    """Share of heads in the four entropy ranges, m = max observed head entropy (paper Fig. 2a)."""
    shares = [100.0 * _float(b) for b in bins]
    fig = _figure()
    ax = fig.subplots()
    bars = ax.bar(BIN_LABELS, shares, color=["#3b528b", "#21918c", "#5ec962", "#fde725"], edgecolor="black")
    for bar, share in zip(bars, shares):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, f"{share:.1f}%", ha="center", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of heads")
    ax.set_xlabel("entropy range (m = max observed head entropy)")
    ax.set_title(title or "entropy-range histogram of attention heads")
    fig.tight_layout()
    return _save(fig, path)


def save_threshold_heatmap(theta, path, title=None) -> Path:
    """Learned threshold fractions theta [L x H] with per-layer mean and variance (paper Fig. 6)."""
    rows = _matrix(theta)
    L, H = len(rows), len(rows[0]) if rows else 1
    fig = _figure(heatmap_figsize(L, H, side_panels=2))
    ax, ax_mean, ax_var = fig.subplots(1, 3, gridspec_kw={"width_ratios": [max(H, 4), 2, 2]})
    _draw_heatmap(fig, ax, rows, None, "magma", colorbar_label="theta (fraction of log T)")
    ax.set_title(title or "learned entropy thresholds theta")
    means = [_nanmean(row) for row in rows]
    variances = [_nanmean([(v - m) ** 2 for v in row]) for row, m in zip(rows, means)]
    for panel, values, label in ((ax_mean, means, "layer mean"), (ax_var, variances, "layer variance")):
        panel.barh(range(L), values, color="#555")
        panel.set_ylim(L - 0.5, -0.5)  # same top-to-bottom layer order as the heatmap
        panel.set_yticks(range(L))
        panel.set_title(label, fontsize=9)
        panel.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return _save(fig, path)


def save_temperature_curves(records, path) -> Path:
    """Per-layer softmax temperature over steps: mean line, min..max band (log scale past a decade)."""
    import matplotlib

    rows = train_records(records, "temperature_mean")
    steps = [r["step"] for r in rows]
    layers = len(rows[0]["temperature_mean"]) if rows else 0
    colors = matplotlib.colormaps["plasma"]
    fig = _figure()
    ax = fig.subplots()
    for layer in range(layers):
        color = colors(layer / max(layers, 1))
        ax.plot(steps, [_float(r["temperature_mean"][layer]) for r in rows], color=color, label=f"layer {layer}")
        if all(r.get("temperature_min") and r.get("temperature_max") for r in rows):
            ax.fill_between(steps, [_float(r["temperature_min"][layer]) for r in rows],
                            [_float(r["temperature_max"][layer]) for r in rows], color=color, alpha=0.15)
    low, high = ax.get_ylim()
    if low > 0 and high / low > 10:  # temperatures can span decades; within one, a log axis shows no labels
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("temperature t (mean, min..max)")
    ax.set_title("learnable softmax temperature per layer")
    ax.legend(fontsize=7, ncol=2 if layers > 8 else 1)
    fig.tight_layout()
    return _save(fig, path)


def save_nan_counts(records, path) -> Path:
    """NaN entries in each layer's attention entropies over steps (the paper's instability signal)."""
    rows = train_records(records, "nan_counts")
    steps = [r["step"] for r in rows]
    layers = len(rows[0]["nan_counts"]) if rows else 0
    fig = _figure()
    ax = fig.subplots()
    for layer in range(layers):
        ax.plot(steps, [_float(r["nan_counts"][layer]) for r in rows], marker=".", label=f"layer {layer}")
    total = sum(_float(v) for r in rows for v in r["nan_counts"])
    ax.set_xlabel("step")
    ax.set_ylabel("NaN count")
    ax.set_title(f"per-layer NaN counts (total {total:g})")
    ax.legend(fontsize=7, ncol=2 if layers > 8 else 1)
    fig.tight_layout()
    return _save(fig, path)


def save_loss_curves(records, path) -> Path:
    """Train loss (total and LM-only) and validation loss over steps."""
    train = train_records(records, "loss")
    evals = sorted((r for r in records if r.get("kind") in ("eval", "final") and r.get("val_loss") is not None),
                   key=lambda r: r.get("step", 0))
    fig = _figure()
    ax = fig.subplots()
    if train:
        ax.plot([r["step"] for r in train], [_float(r["loss"]) for r in train], label="train loss", color="#1f77b4")
        if any(r.get("lm_loss") is not None and r.get("lm_loss") != r.get("loss") for r in train):
            ax.plot([r["step"] for r in train], [_float(r.get("lm_loss")) for r in train],
                    label="train LM loss", color="#1f77b4", linestyle=":")
    if evals:
        ax.plot([r["step"] for r in evals], [_float(r["val_loss"]) for r in evals], marker="o",
                label="validation loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- several runs

def save_bins_comparison(bins_by_variant: dict, path, title=None) -> Path:
    """Grouped four-bin histograms, one bar colour per variant (paper Fig. 2a)."""
    import matplotlib

    names = list(bins_by_variant)
    colors = matplotlib.colormaps["tab10"]
    width = 0.8 / max(len(names), 1)
    fig = _figure()
    ax = fig.subplots()
    for i, name in enumerate(names):
        xs = [b + (i - (len(names) - 1) / 2) * width for b in range(4)]
        ax.bar(xs, [100.0 * _float(v) for v in bins_by_variant[name]], width, label=name, color=colors(i))
    ax.set_xticks(range(4))
    ax.set_xticklabels(BIN_LABELS)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of heads")
    ax.set_xlabel("entropy range (m = max observed head entropy of each model)")
    ax.set_title(title or "entropy-range histogram of attention heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_loss_comparison(curves: dict, path, title=None) -> Path:
    """Loss curves of several runs: curves = {label: (steps, losses)}."""
    fig = _figure()
    ax = fig.subplots()
    for label, (steps, losses) in curves.items():
        ax.plot(steps, [_float(v) for v in losses], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or "training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_depth_entropy_trajectories(trajectories: dict, path, title=None) -> Path:
    """Early-half and deep-half mean layer entropy over steps, one colour per arm, mean over seeds.

    trajectories = {label: [(steps, [[layer means] per step]) per seed]}; solid = deep layers,
    dashed = early layers (how collapse and overload develop with training).
    """
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    fig = _figure()
    ax = fig.subplots()
    for i, (label, seeds) in enumerate(trajectories.items()):
        if not seeds:
            continue
        steps = seeds[0][0]
        for half, style in (("deep", "-"), ("early", "--")):
            per_seed = []
            for seed_steps, rows in seeds:
                by_step = dict(zip(seed_steps, rows))
                per_seed.append([_half_mean(by_step.get(st), half) for st in steps])
            mean = [_nanmean(col) for col in zip(*per_seed)]
            ax.plot(steps, mean, style, color=colors(i % 10), label=f"{label} ({half})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean head entropy (nats, training batches)")
    ax.set_title(title or "early (dashed) and deep (solid) layer entropy over training, mean over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _half_mean(layer_means, half: str) -> float:
    if not layer_means:
        return float("nan")
    split = max(1, len(layer_means) // 2)
    return _nanmean(layer_means[:split] if half == "early" else layer_means[split:] or layer_means)


# ----------------------------------------------------------------------------- one run

def render_run_figures(run_dir, out_dir=None) -> list[Path]:
    """Draw every figure the run's metrics support into out_dir (default <run_dir>/figures)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    records = read_metrics(run_dir)
    paths = []
    last = final_entropy_record(records)
    if last is not None:
        when = f"step {last.get('step')}" + (" (final)" if last.get("kind") == "final" else "")
        paths.append(save_entropy_heatmap(last["entropy"], out / "entropy_heatmap.png",
                                          title=f"per-head attention entropy, {when}"))
        bins = last.get("entropy_bins") or _bins(last["entropy"])
        paths.append(save_entropy_bins(bins, out / "entropy_bins.png", title=f"entropy-range histogram, {when}"))
    if train_records(records, "entropy_layer_mean"):
        paths.append(save_layer_entropy_curves(records, out / "layer_entropy.png"))
    theta = last_with(records, "theta")
    if theta is not None:
        paths.append(save_threshold_heatmap(theta["theta"], out / "thresholds.png",
                                            title=f"learned thresholds theta, step {theta['step']}"))
    if train_records(records, "temperature_mean"):
        paths.append(save_temperature_curves(records, out / "temperature.png"))
    if train_records(records, "nan_counts"):
        paths.append(save_nan_counts(records, out / "nan_counts.png"))
    if train_records(records, "loss") or any(r.get("kind") == "eval" for r in records):
        paths.append(save_loss_curves(records, out / "loss.png"))
    return paths


def log_figures_to_wandb(paths, step=None) -> None:
    """Log PNGs as wandb images under figures/<name>; a no-op when no wandb run is active."""
    wandb = sys.modules.get("wandb")  # never imported: no run can be active
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    images = {f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in paths}
    if images:
        wandb.log(images, step=step) if step is not None else wandb.log(images)


# ----------------------------------------------------------------------------- small helpers

def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _bins(matrix) -> list[float]:
    from megatron_entropy.model.entropy import entropy_bins

    return entropy_bins(matrix)
