"""Analysis: entropy figures, entropy alarms, PI op counts / FLOPs / cost model, paper presets, tools.

Fast (well under 30 s on two cores): figures are drawn from a small synthetic metrics.jsonl.
"""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from megatron_entropy.analysis import alarms, pi_cost, plots
from megatron_entropy.config import build_config
from megatron_entropy.model.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[2]
LOG_T = math.log(128)


# ----------------------------------------------------------------------------- synthetic run

def write_metrics(run_dir: Path, layers=3, heads=4, steps=(0, 10, 20), theta=True, temperature=True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in steps:
        entropy = [[3.8 - layer * (step / 10) + 0.1 * h for h in range(heads)] for layer in range(layers)]
        record = {
            "kind": "train", "step": step, "loss": 5.0 - step / 10, "lm_loss": 5.0 - step / 10,
            "entropy_reg_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "tokens": 100 * step,
            "elapsed_s": step, "log_T": LOG_T, "entropy": entropy,
            "entropy_layer_mean": [sum(r) / heads for r in entropy], "entropy_bins": [0.25, 0.25, 0.25, 0.25],
            "nan_counts": [0.0] * layers,
        }
        if theta:
            record["theta"] = [[0.3 + 0.01 * h for h in range(heads)] for _ in range(layers)]
        if temperature:
            record.update(temperature_mean=[0.01 * (1 + step)] * layers, temperature_min=[0.005] * layers,
                          temperature_max=[0.05 * (1 + step)] * layers, alpha=[1.0] * layers, beta=[1.0] * layers)
        lines.append(json.dumps(record))
        lines.append(json.dumps({"kind": "eval", "step": step, "val_loss": 5.5 - step / 10, "val_ppl": 1.0}))
    lines.append(json.dumps({"kind": "alarm", "step": 20, "alarm": "entropy_collapse", "layer": 2,
                             "value": 0.1, "threshold": 0.48, "message": "x"}))
    lines.append(json.dumps({"kind": "final", "step": steps[-1], "val_loss": 3.0, "val_ppl": 20.0, "wall_s": 1.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"train\", \"st")  # torn last line
    return run_dir


def assert_png(path: Path, size_inches) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        expected = tuple(round(v * plots.DPI) for v in size_inches)
        assert image.size == expected, (path.name, image.size, expected)
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1], f"{path.name} is a blank image"


# ----------------------------------------------------------------------------- figures

def test_render_run_figures_draws_every_figure(tmp_path):
    run = write_metrics(tmp_path / "run")
    paths = plots.render_run_figures(run)
    names = sorted(p.name for p in paths)
    assert names == sorted(["entropy_heatmap.png", "entropy_bins.png", "layer_entropy.png", "thresholds.png",
                            "temperature.png", "nan_counts.png", "loss.png"])
    for path in paths:
        assert path.parent == run / "figures" and path.stat().st_size > 1000
        if path.name == "entropy_heatmap.png":
            assert_png(path, plots.heatmap_figsize(3, 4))
        elif path.name == "thresholds.png":
            assert_png(path, plots.heatmap_figsize(3, 4, side_panels=2))
        else:
            assert_png(path, plots.FIGSIZE)


def test_figures_skip_missing_statistics(tmp_path):
    run = write_metrics(tmp_path / "run", theta=False, temperature=False)
    names = {p.name for p in plots.render_run_figures(run, tmp_path / "out")}
    assert "thresholds.png" not in names and "temperature.png" not in names
    assert {"entropy_heatmap.png", "loss.png", "nan_counts.png"} <= names


def test_heatmap_size_grows_with_the_grid_and_shows_nan(tmp_path):
    matrix = [[float("nan") if (l, h) == (17, 0) else 3.0 - l / 6 for h in range(12)] for l in range(18)]
    path = plots.save_entropy_heatmap(matrix, tmp_path / "h.png", title="18 x 12", vmax=math.log(128))
    assert_png(path, plots.heatmap_figsize(18, 12))
    assert plots.heatmap_figsize(18, 12)[1] > plots.heatmap_figsize(4, 4)[1]


def test_read_metrics_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        plots.read_metrics(tmp_path)


def test_wandb_helpers_are_noops_without_a_run(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    plots.log_figures_to_wandb([tmp_path / "x.png"], step=1)  # wandb never imported: nothing happens
    alarms.wandb_alert({"alarm": "entropy_collapse", "message": "m"})
    calls = []
    fake = types.SimpleNamespace(run=None, alert=lambda **kw: calls.append(kw), log=lambda *a, **k: calls.append(a),
                                 Image=lambda p: p)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plots.log_figures_to_wandb([tmp_path / "x.png"], step=1)
    alarms.wandb_alert({"alarm": "entropy_collapse", "message": "m"})
    assert calls == []
    fake.run = types.SimpleNamespace(offline=True, disabled=False)  # offline run: no alert
    alarms.wandb_alert({"alarm": "entropy_collapse", "message": "m"})
    assert calls == []
    fake.run = types.SimpleNamespace(offline=False, disabled=False)
    alarms.wandb_alert({"alarm": "entropy_collapse", "message": "layer 3 collapsed"})
    plots.log_figures_to_wandb([tmp_path / "x.png"], step=7)
    assert calls[0]["text"] == "layer 3 collapsed" and "figures/x" in calls[1][0]


# ----------------------------------------------------------------------------- alarms

def healthy(layers=4, heads=4):
    return [[1.0, 1.5, 1.8, 2.6][:heads] for _ in range(layers)]  # spread over the bins: 25% on top


def test_alarms_quiet_on_healthy_statistics():
    checker = alarms.EntropyAlarms(LOG_T)
    assert all(checker.check(step, healthy()) == [] for step in range(0, 100, 10))


def test_collapse_fires_once_per_episode_and_rearms():
    checker = alarms.EntropyAlarms(LOG_T, collapse_fraction=0.1)
    collapsed = healthy()
    collapsed[3] = [0.05, 0.1, 0.2, 0.1]  # layer 3 mean 0.11 < 0.1 * log 128 = 0.485
    first = checker.check(10, collapsed)
    assert [(r["alarm"], r["layer"]) for r in first] == [("entropy_collapse", 3)]
    record = first[0]
    assert record["kind"] == "alarm" and record["step"] == 10
    assert record["value"] == pytest.approx(0.1125) and record["threshold"] == pytest.approx(0.1 * LOG_T)
    assert "layer 3" in record["message"]
    assert checker.check(20, collapsed) == []  # same episode: silent
    assert checker.check(30, healthy()) == []  # cleared: re-armed
    assert [r["layer"] for r in checker.check(40, collapsed)] == [3]


def test_overload_fires_once_per_episode_and_rearms():
    checker = alarms.EntropyAlarms(LOG_T, overload_share=0.5)
    overloaded = [[3.8, 3.7, 3.6, 1.0]] * 4  # 75% of heads in [3m/4, m]
    first = checker.check(5, overloaded)
    assert [(r["alarm"], r["layer"]) for r in first] == [("entropic_overload", None)]
    assert first[0]["value"] == pytest.approx(0.75) and first[0]["threshold"] == 0.5
    assert checker.check(6, overloaded) == []
    assert checker.check(7, healthy()) == []
    assert len(checker.check(8, overloaded)) == 1


def test_alarms_do_not_refire_while_hovering_at_the_threshold():
    checker = alarms.EntropyAlarms(LOG_T, overload_share=0.5)
    at = [[3.8, 3.7, 1.0, 1.0]] * 4  # exactly 50%: not overloaded, but not clearly healthy either
    above = [[3.8, 3.7, 3.6, 1.0]] + [[3.8, 3.7, 1.0, 1.0]] * 3  # 9/16 = 56%
    assert len(checker.check(1, above)) == 1
    assert checker.check(2, at) == [] and checker.check(3, above) == []  # same episode
    assert checker.check(4, healthy()) == [] and len(checker.check(5, above)) == 1  # cleared, re-armed
    collapse = alarms.EntropyAlarms(LOG_T)

    def first_layer_at(fraction):  # layer 0's mean at fraction x the collapse threshold, others healthy
        return [[fraction * 0.1 * LOG_T] * 4] + healthy(layers=3)

    assert len(collapse.check(1, first_layer_at(0.9))) == 1
    assert collapse.check(2, first_layer_at(1.05)) == [] and collapse.check(3, first_layer_at(0.9)) == []
    assert collapse.check(4, first_layer_at(1.2)) == [] and len(collapse.check(5, first_layer_at(0.9))) == 1


def test_alarms_grace_steps_and_nan_layers():
    checker = alarms.EntropyAlarms(LOG_T, grace_steps=100)
    collapsed = [[0.01] * 4] * 4
    assert checker.check(50, collapsed) == []
    assert len(checker.check(100, collapsed)) == 4  # one per collapsed layer
    nan_layer = healthy()
    nan_layer[0] = [float("nan")] * 4
    assert alarms.EntropyAlarms(LOG_T).check(0, nan_layer) == []


# ----------------------------------------------------------------------------- PI accounting

@pytest.mark.parametrize("row", pi_cost.PUBLISHED, ids=lambda r: f"table{r.table}-{r.variant}")
def test_flops_reproduce_the_paper_tables(row):
    spec = VARIANTS[row.variant]
    assert pi_cost.format_flops(pi_cost.ffn_flops(spec, row.shape)) == row.ffn_flops
    assert pi_cost.format_flops(pi_cost.attention_flops(row.shape)) == row.attention_flops


def test_every_printed_flops_value_is_covered():
    printed = {r.ffn_flops for r in pi_cost.PUBLISHED} | {r.attention_flops for r in pi_cost.PUBLISHED}
    assert printed == {"14.5B", "7.7B", "1.8B", "58.0B", "36.2B", "7.3B", "29.0B", "16.3B", "3.6B",
                       "21.7B", "11.6B", "2.7B"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_nonlinear_op_counts_for_every_variant(name):
    spec, shape = VARIANTS[name], pi_cost.Shape.gpt2(12, 128)
    ops = pi_cost.nonlinear_ops(spec, shape)
    assert ops.softmax == 144
    has_ln = name.startswith("SM+LN")
    assert ops.layernorm == (24 if has_ln else 0)
    activation = {"G": "gelu", "R": "relu"}.get(name.split("+")[-1]) if name in ("SM+LN+G", "SM+LN+R", "SM+G", "SM+R") else None
    assert ops.activation == activation and ops.activations == (12 if activation else 0)
    assert ops.final_norm == has_ln  # LN-free variants drop ln_f; it is never counted anyway
    expected = "SM 144xR^{128x128}" + ("; LN 24xR^{128x768}" if has_ln else "") + \
        (f"; {activation[0].upper()} 12xR^{{128x3072}}" if activation else "")
    assert ops.describe() == expected


def test_op_elements_and_ffn_hidden_generalisation():
    shape = pi_cost.Shape(num_layers=2, num_heads=4, hidden_size=64, seq_length=32, ffn_hidden_size=100)
    ops = pi_cost.nonlinear_ops(VARIANTS["SM+LN+G"], shape).elements
    assert ops == {"softmax": 2 * 4 * 32 * 32, "layernorm": 2 * 2 * 32 * 64, "gelu": 2 * 32 * 100, "relu": 0}
    assert pi_cost.ffn_flops(VARIANTS["SM+LN+G"], shape) == 4 * 32 * 64 * 100 * 2
    assert pi_cost.ffn_flops(VARIANTS["SM+ScFuFFN"], shape) == 2 * 32 * 64 * 64 * 2


def test_nnls_matches_a_known_solution():
    import numpy as np

    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert pi_cost.nnls(A, np.array([1.0, 2.0, 3.0])) == pytest.approx([1.0, 2.0])
    assert pi_cost.nnls(A, np.array([-1.0, 2.0, 1.0])) == pytest.approx([0.0, 1.5])  # clamped at 0


def test_cost_model_errors_against_the_published_numbers():
    report = pi_cost.fit_report()
    assert report["measurements"] == 12 and report["parameters"] == len(pi_cost.FEATURES)
    assert all(v >= 0 for v in report["comm_coefficients"].values())
    print("\ntable variant L T | comm GB est err LOO | latency min est err LOO")
    for r in report["rows"]:
        values = [r[k] for k in ("comm_est", "comm_err", "comm_loo_err", "latency_est", "latency_err", "latency_loo_err")]
        assert all(math.isfinite(v) for v in values)
        print(f"{r['table']:5s} {r['variant']:20s} {r['num_layers']:2d} {r['seq_length']:3d} | "
              f"{r['comm_gb']:7.2f} {r['comm_est']:7.2f} {100 * r['comm_err']:+6.1f}% {100 * r['comm_loo_err']:+6.1f}% | "
              f"{r['latency_min']:6.2f} {r['latency_est']:6.2f} {100 * r['latency_err']:+6.1f}% {100 * r['latency_loo_err']:+6.1f}%")
    print({k: round(v, 4) for k, v in report["summary"].items()})
    # Regression guard for the current model form (see docs/analysis.md for the numbers).
    assert report["summary"]["comm_err_abs_max"] < 0.05
    assert report["summary"]["latency_err_abs_max"] < 0.15


def test_savings_are_against_the_baseline_of_the_same_shape():
    shape = pi_cost.Shape.gpt2(12, 128)
    rows = pi_cost.shape_report(shape, [(n, VARIANTS[n]) for n in ("SM+LN+G", "SM+ScFuFFN")])
    assert rows[0]["comm_saving"] == pytest.approx(1.0)
    assert rows[1]["comm_saving"] == pytest.approx(25.32 / 6.43, rel=0.03)  # paper: 3.94x


# ----------------------------------------------------------------------------- presets

PRESETS = sorted((ROOT / "configs" / "paper").rglob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_paper_presets_validate(path):
    cfg = build_config(str(path)).validate(world_size=1)
    assert cfg.parallel.tensor == cfg.parallel.pipeline == 1
    assert cfg.model.hidden_size == 768 and cfg.model.num_heads == 12
    name = str(path.relative_to(ROOT / "configs" / "paper").with_suffix(""))
    assert build_config(f"paper/{name}").to_dict() == cfg.to_dict()  # reachable by preset name too


def test_presets_cover_every_experiment():
    names = {str(p.relative_to(ROOT / "configs" / "paper")) for p in PRESETS}
    for table, count in (("table2", 6), ("table3", 4), ("table4", 12), ("table5", 10), ("table6", 3),
                         ("table7", 4), ("table8", 4), ("gamma", 7)):
        assert sum(n.startswith(table + "/") for n in names) == count, table
    assert build_config("paper/table7/sm_ln_g").model.seq_length == 256
    assert build_config("paper/table8/sm_scfuffn").model.num_layers == 18
    assert build_config("paper/table4/sm_ln_g_4p8b").train.global_batch_size == 256
    assert build_config("paper/gamma/ereg_gamma_005").model.entropy_tolerance == 0.05


# ----------------------------------------------------------------------------- tools

def load_tool(name):
    """Import tools/<name>.py as a module (in-process: no interpreter start-up per case)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pi_cost_tool_json_and_errors():
    out = run_tool("tools/pi_cost.py", "paper/table3/sm_ln_g", "tiny", "--variants", "SM+LN+G", "SM+ScFuFFN",
                   "--json", "--model.num_layers", "12")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    first = data["configs"][0]["rows"]
    assert [r["ffn_flops_str"] for r in first] == ["14.5B", "1.8B"]
    assert len(data["fit"]["rows"]) == len(pi_cost.PUBLISHED) + len(pi_cost.HELD_OUT)


@pytest.mark.parametrize("bad", [["nope"], ["tiny", "--model.bogus", "1"], ["tiny", "--variants", "XX"], []])
def test_pi_cost_tool_bad_input(bad, capsys):
    tool = load_tool("pi_cost")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(tool.main(bad))
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""
    assert out.err.startswith("error: ") and out.err.count("\n") == 1


def test_plot_entropy_tool(tmp_path, capsys):
    run = write_metrics(tmp_path / "run")
    out = run_tool("tools/plot_entropy.py", str(run), "--out", str(tmp_path / "figs"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "figs").glob("*.png"))) == 7
    assert load_tool("plot_entropy").main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- study report (no training)

def _synthetic_study(tmp_path, deep_drop: dict, val_loss: dict, seeds=(1, 2, 3)):
    """Runs of SM+LN+G, SM, SM+ScFuFFN and EReg whose numbers we choose, one metrics.jsonl each."""
    from megatron_entropy.analysis import study

    settings = study.StudySettings(study.STUDY_VARIANTS, steps=20, seeds=seeds)
    outcomes = []
    for run in study.plan(settings):
        jitter = 0.01 * run.seed
        run_dir = tmp_path / "runs" / run.name
        write_metrics(run_dir, layers=4, theta=False, temperature=False)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]  # drop the torn line
        drop = deep_drop[run.arm.label]
        entropy = [[3.2 - (drop if layer >= 2 else 0.0) - jitter for _ in range(4)] for layer in range(4)]
        lines[-1] = json.dumps({"kind": "final", "step": 20, "val_loss": val_loss[run.arm.label] + jitter,
                                "val_ppl": 1.0, "wall_s": 1.0, "entropy": entropy})
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        outcomes.append(study.RunOutcome(run, run_dir, 0, 1.0, []))
    return settings, [study.summarize_run(o) for o in outcomes]


def test_study_verdicts_follow_the_numbers(tmp_path):
    from megatron_entropy.analysis import study_report

    # SM's deep layers at 0.2 nats (bottom bin: < 3.2/4), the baseline's at 2.7; EReg 5 % better.
    settings, summaries = _synthetic_study(
        tmp_path, deep_drop={"SM+LN+G": 0.5, "SM": 3.0, "SM+ScFuFFN": 0.5, "EReg(SM(t)+ScFuFFN)": 0.5},
        val_loss={"SM+LN+G": 4.0, "SM": 4.5, "SM+ScFuFFN": 4.3, "EReg(SM(t)+ScFuFFN)": 4.3 + math.log(0.95)})
    sm = next(s for s in summaries if s["label"] == "SM")
    assert sm["deep_bottom_bin"] == 1.0 and sm["early_top_bin"] == 1.0 and sm["seed"] == 1
    assert sm["deep_entropy"] == pytest.approx(0.19) and sm["val_ppl"] == pytest.approx(math.exp(4.51))
    verdicts = {f["name"]: f for f in study_report.findings(study_report.group(summaries))}
    assert verdicts["SM entropy collapse in deep layers"]["verdict"] == "reproduced"
    assert verdicts["EReg gain over SM+ScFuFFN"]["verdict"] == "reproduced"
    assert "EReg better by 5.0 %" in verdicts["EReg gain over SM+ScFuFFN"]["lines"][0]
    # Every early head of every variant is in the top bin: no difference to test, the baseline is not specialised.
    assert verdicts["entropic overload in early layers"]["verdict"] == "not reproduced"
    report = study_report.write_report(tmp_path, summaries, settings, total_s=2.0).read_text()
    assert "### SM entropy collapse in deep layers: **reproduced**" in report
    assert "| SM | 3 | " in report and "± " in report
    for image in ("figures/entropy_bins.png", "figures/train_loss.png", "figures/heatmap_sm_ln_g.png",
                  "figures/entropy_trajectories.png"):
        assert f"({image})" in report and (tmp_path / image).is_file()


def test_study_verdict_not_reproduced_when_the_difference_is_noise(tmp_path):
    from megatron_entropy.analysis import study_report

    settings, summaries = _synthetic_study(
        tmp_path, deep_drop=dict.fromkeys(("SM+LN+G", "SM", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)"), 0.5),
        val_loss={"SM+LN+G": 4.0, "SM": 4.0, "SM+ScFuFFN": 4.3, "EReg(SM(t)+ScFuFFN)": 4.31})
    verdicts = {f["name"]: f["verdict"] for f in study_report.findings(study_report.group(summaries))}
    assert verdicts == {"SM entropy collapse in deep layers": "not reproduced",
                        "entropic overload in early layers": "not reproduced",
                        "EReg gain over SM+ScFuFFN": "not reproduced"}


def test_study_summary_of_a_run_that_wrote_nothing(tmp_path):
    from megatron_entropy.analysis import study

    run = study.RunSpec(study.Arm("SM", "SM"), seed=1)
    summary = study.summarize_run(study.RunOutcome(run, tmp_path / "missing", 1, 0.5, []))
    assert study.unstable(summary) and summary["entropy"] is None and not study.loss_spiked(summary)
    assert study.slug("EReg(SM(t)+ScFuFFN)") == "ereg_sm_t_scfuffn" and run.name == "sm_seed1"


def _student_t_pdf(x, df):
    return math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)


def _student_t_tail(t, df, n=20000):
    """P(T > t) by Simpson's rule on [0, t] (independent of scipy)."""
    h = t / n
    area = sum((1 if i in (0, n) else 4 if i % 2 else 2) * _student_t_pdf(i * h, df) for i in range(n + 1)) * h / 3
    return 0.5 - area


def _student_t_quantile(q, df):
    low, high = 0.0, 50.0
    for _ in range(60):  # bisection on the tail
        mid = (low + high) / 2
        low, high = (mid, high) if _student_t_tail(mid, df, 2000) > 1 - q else (low, mid)
    return (low + high) / 2


def test_seed_statistics_against_hand_computed_values():
    from megatron_entropy.analysis import stats

    iv = stats.mean_interval([1.0, 2.0, 3.0, float("nan")])
    # sd 1, n 3, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3)
    assert iv.mean == 2.0 and iv.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.n == 3 and iv.n_dropped == 1
    c = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    # Welch by hand: se^2 = 1/3 + (5/3)/4, df = se^4 / ((1/3)^2/2 + (5/12)^2/3)
    se = math.sqrt(1 / 3 + 5 / 12)
    df = se ** 4 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    assert c.difference == -3.5 and df == pytest.approx(4.959, abs=1e-3)
    t = 3.5 / se
    assert c.p_value == pytest.approx(2 * _student_t_tail(t, df), rel=1e-4) and c.significant
    assert c.half_width == pytest.approx(_student_t_quantile(0.975, df) * se, rel=1e-4)
    assert not stats.welch([1.0, 2.0], [1.5, 2.5]).significant
