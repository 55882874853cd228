#!/usr/bin/env python
"""Private-inference cost of a config: nonlinear ops, FLOPs, estimated 2PC communication/latency.

    python tools/pi_cost.py paper/table3/sm_ln_g configs/tiny.yaml [--variants all] [--json]
    python tools/pi_cost.py tiny --model.num_layers 18 --model.hidden_size 768 --model.num_heads 12
    python tools/pi_cost.py paper/table3/sm_ln_g --variants all --measured [COEFFICIENTS.json]

CONFIG is a preset name or YAML path; `--section.key value` overrides apply to every config.
Communication and latency come from one of two models:
  default     a per-operation linear model fitted to the paper's BumbleBee measurements (Tables 3,
              4, 7, 8); the second table shows how well it fits them.
  --measured  per-operation costs fitted to our own SPU (CHEETAH) measurements of small models
              (tools/pi_measure.py --study; the committed analysis/pi_measured_cheetah.json), summed
              over the forward's stages; latency = compute + bytes / bandwidth + rounds x RTT. The
              second table extrapolates them to every published GPT-2 configuration, with the error.
Savings are against SM+LN+G of the same shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis import pi_cost  # noqa: E402
from megatron_entropy.analysis.cli import OneLineParser, split_overrides  # noqa: E402
from megatron_entropy.config import ConfigError, build_config  # noqa: E402
from megatron_entropy.model.variants import VARIANTS  # noqa: E402


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0], epilog="Config overrides: --model.num_layers 18 etc. (see docs/analysis.md)",
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="preset name (configs/<name>.yaml) or YAML path")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to cost at each config's shape ('all' for every variant; default: the config's own)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--measured", nargs="?", const="", metavar="COEFFICIENTS",
                        help="use measured per-operation costs (default file: analysis/pi_measured_cheetah.json)")
    parser.add_argument("--vocab-size", type=int, help="with --measured: vocabulary of the embedding and head "
                        "(default: the config's, else GPT-2's 50257)")
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="with --measured (default 100)")
    parser.add_argument("--rtt-ms", type=float, default=80.0, help="with --measured (default 80)")
    return parser


def config_rows(name: str, overrides: list[str], variants: list[str] | None, model, measured=None) -> dict:
    cfg = build_config(name, overrides)
    cfg.model.spec()  # the variant and switches must resolve
    shape = pi_cost.Shape.from_model_config(cfg.model)
    if not variants:
        chosen = [(cfg.model.variant, cfg.model.spec())]
    else:
        names = list(VARIANTS) if variants == ["all"] else variants
        chosen = [(v, VARIANTS[v]) for v in names]
    if measured is None:
        return {"config": name, "shape": vars(shape), "rows": pi_cost.shape_report(shape, chosen, model)}
    vocab = measured["vocab_size"] or cfg.model.vocab_size or pi_cost.GPT2_VOCAB
    rows = pi_cost.measured_shape_report(shape, chosen, measured["coefficients"], vocab, **measured["network"])
    return {"config": name, "shape": {**vars(shape), "vocab_size": vocab}, "rows": rows}


def print_measured_fit(fit: dict, source: str) -> None:
    print(f"\nMeasured per-operation costs ({source}) extrapolated to the paper's GPT-2 configurations "
          "(vocabulary 50257); latency = compute + transfer + rounds x RTT")
    header = ("table", "variant", "L", "T", "comm GB", "est", "err", "lat min", "est", "err",
              "transfer", "rounds", "compute")
    rows = [(r["table"], r["variant"], r["num_layers"], r["seq_length"], f"{r['comm_gb']:.2f}", f"{r['comm_est']:.2f}",
             f"{100 * r['comm_err']:+.1f}%", f"{r['latency_min']:.2f}", f"{r['latency_est']:.2f}",
             f"{100 * r['latency_err']:+.1f}%", f"{r['transfer_min_est']:.2f}", f"{r['rounds_min_est']:.2f}",
             f"{r['compute_min_est']:.2f}") for r in fit["rows"]]
    _print_table(header, rows)
    s = fit["summary"]
    print(f"  |err| against the 12 published rows: comm mean {100 * s['comm_err_abs_mean']:.1f}% max "
          f"{100 * s['comm_err_abs_max']:.1f}%; latency mean {100 * s['latency_err_abs_mean']:.1f}% max "
          f"{100 * s['latency_err_abs_max']:.1f}% (an extrapolation from small shapes: see docs/pi.md)")


def print_tables(results: list[dict], fit: dict, measured: bool = False) -> None:
    for result in results:
        s = result["shape"]
        print(f"\n{result['config']}: L={s['num_layers']} H={s['num_heads']} d={s['hidden_size']} "
              f"T={s['seq_length']} ffn={s['ffn_hidden_size']}")
        header = ("variant", "nonlinear ops", "ln_f", "FLOPs FFN", "FLOPs Attn", "comm GB", "lat min", "comm save", "lat save")
        rows = [(r["variant"], r["nonlinear_ops"], r["final_norm"], r["ffn_flops_str"], r["attention_flops_str"],
                 f"{r['comm_gb_est']:.2f}", f"{r['latency_min_est']:.2f}",
                 f"{r['comm_saving']:.2f}x", f"{r['latency_saving']:.2f}x") for r in result["rows"]]
        _print_table(header, rows)
        if measured:
            print("  ln_f = the final LayerNorm; comm/latency: measured SPU CHEETAH per-operation costs, summed over "
                  "the forward (embedding and head included)")
        else:
            print("  ln_f = the final LayerNorm, never counted (as in the paper); comm/latency are model estimates,\n"
                  "  fitted at GPT-2 small shapes (d=768, H=12, T=128..512, L=12..18): far from them they extrapolate")
    if measured:
        return
    print(f"\nPI cost model fit to the paper's BumbleBee numbers ({fit['measurements']} distinct measurements, "
          f"{fit['parameters']} non-negative coefficients; LOO = refitted without that configuration)")
    header = ("table", "variant", "L", "T", "comm GB", "est", "err", "LOO err", "lat min", "est", "err", "LOO err")
    rows = [(r["table"], r["variant"], r["num_layers"], r["seq_length"],
             f"{r['comm_gb']:.2f}", f"{r['comm_est']:.2f}", f"{100 * r['comm_err']:+.1f}%", _loo(r, "comm"),
             f"{r['latency_min']:.2f}", f"{r['latency_est']:.2f}", f"{100 * r['latency_err']:+.1f}%", _loo(r, "latency"))
            for r in fit["rows"]]
    _print_table(header, rows)
    s = fit["summary"]
    print(f"  |err| comm: mean {100 * s['comm_err_abs_mean']:.1f}% max {100 * s['comm_err_abs_max']:.1f}% "
          f"(LOO mean {100 * s['comm_loo_err_abs_mean']:.1f}% max {100 * s['comm_loo_err_abs_max']:.1f}%); "
          f"latency: mean {100 * s['latency_err_abs_mean']:.1f}% max {100 * s['latency_err_abs_max']:.1f}% "
          f"(LOO mean {100 * s['latency_loo_err_abs_mean']:.1f}% max {100 * s['latency_loo_err_abs_max']:.1f}%)")
    print("  AERO row: out of sample (secondary source), not used in the fit")


def _loo(row: dict, metric: str) -> str:
    return f"{100 * row[f'{metric}_loo_err']:+.1f}%" if row["in_fit"] else "-"


def _print_table(header, rows) -> None:
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        unknown = [v for v in (args.variants or []) if v != "all" and v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)} or 'all'")
        if args.bandwidth_mbps <= 0 or args.rtt_ms < 0:
            raise ConfigError("--bandwidth-mbps must be > 0 and --rtt-ms >= 0")
        measured = None
        if args.measured is not None:
            measured = {"coefficients": _load_measured(args.measured), "vocab_size": args.vocab_size,
                        "network": {"bandwidth_mbps": args.bandwidth_mbps, "rtt_ms": args.rtt_ms}}
        model = pi_cost.fit_cost_model()
        results = [config_rows(name, overrides, args.variants, model, measured) for name in args.configs]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if measured is not None:
        fit = pi_cost.measured_vs_paper(measured["coefficients"], **measured["network"])
    else:
        fit = pi_cost.fit_report()
    if args.json:
        print(json.dumps({"configs": results, "fit": fit, "mode": "measured" if measured else "paper_fit"}, indent=1))
    else:
        print_tables(results, fit, measured is not None)
        if measured is not None:
            print_measured_fit(fit, args.measured or "analysis/pi_measured_cheetah.json")
    return 0


def _load_measured(path: str) -> dict:
    from megatron_entropy.analysis import pi_measured

    try:
        doc = pi_measured.load_coefficients(path or None)
        coefficients = doc["coefficients"]
        missing = [c for c in ("matmul", "softmax_max", "softmax_exp", "softmax_normalize") if c not in coefficients]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read measured coefficients {path or pi_measured.COEFFICIENTS_FILE} ({e}); "
                          "write them with tools/pi_measure.py --study") from None
    if missing:
        raise ConfigError(f"{path}: no measured coefficients for {missing[0]}; write them with tools/pi_measure.py --study")
    return coefficients


if __name__ == "__main__":
    sys.exit(main())
