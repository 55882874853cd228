#!/usr/bin/env python
"""Private-inference cost of a config: nonlinear ops, FLOPs, estimated 2PC communication/latency.

    python tools/pi_cost.py paper/table3/sm_ln_g configs/tiny.yaml [--variants all] [--json]
    python tools/pi_cost.py tiny --model.num_layers 18 --model.hidden_size 768 --model.num_heads 12

CONFIG is a preset name or YAML path; `--section.key value` overrides apply to every config.
Communication and latency come from a per-operation linear model fitted to the paper's BumbleBee
measurements (Tables 3, 4, 7, 8); the second table shows how well it fits them. Savings are
against SM+LN+G of the same shape.
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
    return parser


def config_rows(name: str, overrides: list[str], variants: list[str] | None, model) -> dict:
    cfg = build_config(name, overrides)
    cfg.model.spec()  # the variant and switches must resolve
    shape = pi_cost.Shape.from_model_config(cfg.model)
    if not variants:
        chosen = [(cfg.model.variant, cfg.model.spec())]
    else:
        names = list(VARIANTS) if variants == ["all"] else variants
        chosen = [(v, VARIANTS[v]) for v in names]
    return {"config": name, "shape": vars(shape), "rows": pi_cost.shape_report(shape, chosen, model)}


def print_tables(results: list[dict], fit: dict) -> None:
    for result in results:
        s = result["shape"]
        print(f"\n{result['config']}: L={s['num_layers']} H={s['num_heads']} d={s['hidden_size']} "
              f"T={s['seq_length']} ffn={s['ffn_hidden_size']}")
        header = ("variant", "nonlinear ops", "ln_f", "FLOPs FFN", "FLOPs Attn", "comm GB", "lat min", "comm save", "lat save")
        rows = [(r["variant"], r["nonlinear_ops"], r["final_norm"], r["ffn_flops_str"], r["attention_flops_str"],
                 f"{r['comm_gb_est']:.2f}", f"{r['latency_min_est']:.2f}",
                 f"{r['comm_saving']:.2f}x", f"{r['latency_saving']:.2f}x") for r in result["rows"]]
        _print_table(header, rows)
        print("  ln_f = the final LayerNorm, never counted (as in the paper); comm/latency are model estimates,\n"
              "  fitted at GPT-2 small shapes (d=768, H=12, T=128..512, L=12..18): far from them they extrapolate")
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
        model = pi_cost.fit_cost_model()
        results = [config_rows(name, overrides, args.variants, model) for name in args.configs]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fit = pi_cost.fit_report()
    if args.json:
        print(json.dumps({"configs": results, "fit": fit}, indent=1))
    else:
        print_tables(results, fit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
