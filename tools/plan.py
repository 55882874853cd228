#!/usr/bin/env python
"""Will a layout fit, how does its memory split, how fast will it run? (before `sbatch`)

    python tools/plan.py 1b --nodes 4 --gpus-per-node 8 --gpu h100          # slurm/pretrain_1b.sh
    python tools/plan.py 1b --nodes 4 --gpu h200 --zero 3 --micro-batch 8 --recompute
    python tools/plan.py 1b --nodes 4 --gpu h100 --search                   # every layout that fits
    python tools/plan.py tiny --model.num_layers 8 --json

PRESET is a preset name or YAML path; `--section.key value` overrides apply as in train.py. The
layout defaults to the preset's (parallel.tensor / pipeline / activation_checkpointing, train.*),
ZeRO to 1 (ds_configs/zero1.json, the Slurm scripts' default). Memory is per device, in GiB
(2^30 bytes); what each number counts is in megatron_entropy/analysis/plan.py and docs/planning.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis import plan  # noqa: E402
from megatron_entropy.analysis.cli import OneLineParser, fail, split_overrides  # noqa: E402
from megatron_entropy.analysis.flops import training_flops_per_token  # noqa: E402
from megatron_entropy.config import ConfigError, build_config  # noqa: E402

# nvidia-smi's total memory of each part, in GiB.
GPUS = {"h100": 79.6, "h200": 140.4, "a100": 79.2, "cpu": 24.0}


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", metavar="PRESET", help="preset name (configs/<name>.yaml) or YAML path")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="sets the memory and bf16 peak (default h100)")
    p.add_argument("--gpu-memory-gib", type=float, help="device memory (default: the --gpu's)")
    p.add_argument("--tensor", type=int, help="TP size (default: the preset's parallel.tensor)")
    p.add_argument("--pipeline", type=int, help="PP size (default: the preset's parallel.pipeline)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 1, or the --ds-config's)")
    p.add_argument("--ds-config", help="DeepSpeed JSON: its ZeRO stage and offload")
    p.add_argument("--offload", action="store_true", help="ZeRO-3 with parameters and optimizer on the host")
    p.add_argument("--micro-batch", type=int, help="default: the preset's train.micro_batch_size")
    p.add_argument("--global-batch", type=int, help="default: the preset's train.global_batch_size")
    p.add_argument("--precision", choices=sorted(plan.BYTES), help="default: the preset's train.precision")
    p.add_argument("--recompute", choices=("on", "off"), help="activation recompute (default: the preset's)")
    p.add_argument("--core", choices=("fused", "eager"), default="fused",
                   help="attention core computing the entropy (default fused: what auto picks on GPUs)")
    p.add_argument("--vocab-size", type=int, help="default: model.vocab_size, else data.tokenizer_vocab_size")
    p.add_argument("--mfu", type=float, default=plan.ASSUMED_MFU,
                   help=f"assumed model FLOPs utilisation (default {plan.ASSUMED_MFU}: no measured GPU run yet)")
    p.add_argument("--peak-tflops", type=float, help="dense peak of one device (default: the --gpu's bf16 peak)")
    p.add_argument("--search", action="store_true", help="rank every layout of these devices that fits")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    return p


def gib(n: float) -> str:
    return f"{n / plan.GIB:.2f}"


def layout_from_args(args, cfg) -> plan.Layout:
    zero, offload = args.zero, args.offload
    if args.ds_config:
        from megatron_entropy.training.engine import load_ds_config  # noqa: PLC0415 (imports torch)

        ds = load_ds_config(args.ds_config)
        zo = ds.get("zero_optimization", {})
        zero = int(zo.get("stage", 0)) if zero is None else zero
        offload = offload or "offload_optimizer" in zo or "offload_param" in zo
    recompute = cfg.parallel.activation_checkpointing if args.recompute is None else args.recompute == "on"
    return plan.Layout(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tensor=args.tensor or cfg.parallel.tensor, pipeline=args.pipeline or cfg.parallel.pipeline,
        zero=1 if zero is None else zero, micro_batch=args.micro_batch or cfg.train.micro_batch_size,
        global_batch=args.global_batch or cfg.train.global_batch_size,
        precision=args.precision or cfg.train.precision, recompute=recompute, core=args.core, offload=offload,
        gpu_memory_gib=args.gpu_memory_gib or GPUS[args.gpu],
    )


def report(cfg, lay: plan.Layout, mfu: float, peak: float) -> dict:
    """Everything the planner says about one layout, as plain numbers."""
    m = plan.ModelShape.from_model_config(cfg.model)
    flops = training_flops_per_token(cfg.model)
    stage, mem = plan.peak_memory(m, lay)
    grid = {}
    for precision in ("bf16", "fp32"):
        for recompute in (False, True):
            for core in ("fused", "eager"):
                key = f"{precision} {'recompute' if recompute else 'no-recompute'} {core}"
                row = {}
                for zero, offload in ((0, False), (1, False), (2, False), (3, False), (3, True)):
                    alt = replace(lay, precision=precision, recompute=recompute, core=core, zero=zero, offload=offload)
                    row[f"zero{zero}{'+offload' if offload else ''}"] = (
                        None if alt.problem(m) else plan.peak_memory(m, alt)[1].total)
                grid[key] = row
    by_zero = {}
    for zero in range(4):
        alt = replace(lay, zero=zero, offload=lay.offload and zero == 3)
        if not alt.problem(m):
            by_zero[zero] = asdict(plan.peak_memory(m, alt)[1])
    step = plan.step_time_s(flops, lay, m.seq, peak, mfu)
    return {
        "layout": asdict(lay), "problem": lay.problem(m), "params_total": plan.total_params(m),
        "params_per_rank_by_stage": plan.stage_params(m, lay.tensor, lay.pipeline),
        "layers_by_stage": plan.stage_layers(m, lay.tensor, lay.pipeline),
        "peak_stage": stage, "memory": asdict(mem), "peak_bytes": mem.total, "memory_by_zero": by_zero, "grid": grid,
        "fits": mem.total <= lay.gpu_memory_gib * plan.GIB * 0.95,
        "largest_micro_batch": plan.largest_micro_batch(m, lay),
        "tokens_per_step": lay.global_batch * m.seq, "flops_per_token": flops,
        "mfu": mfu, "peak_tflops": peak, "step_s": step, "tokens_per_s": lay.global_batch * m.seq / step,
        "communication": plan.communication_bytes(m, lay),
        "host_per_node": plan.host_bytes_per_node(m, lay, cfg.train.max_steps * lay.global_batch),
    }


def print_report(r: dict, name: str) -> None:
    lay = plan.Layout(**r["layout"])
    print(f"{name}: {lay.nodes} node(s) x {lay.gpus_per_node} devices of {lay.gpu_memory_gib:g} GiB; TP{lay.tensor} "
          f"PP{lay.pipeline} DP{lay.dp} ZeRO-{lay.zero}{' + offload' if lay.offload else ''}, {lay.precision}, "
          f"micro-batch {lay.micro_batch} x {lay.accumulation} accumulation, recompute "
          f"{'on' if lay.recompute else 'off'}, {lay.core} core")
    if r["problem"]:
        print(f"  layout problem: {r['problem']}")
    print(f"  parameters: {r['params_total'] / 1e9:.3f} B total; per rank by pipeline stage "
          f"{[f'{n / 1e6:.1f} M' for n in r['params_per_rank_by_stage']]} (layers {r['layers_by_stage']})")
    header = ["GiB per device"] + [f"ZeRO-{z}" for z in r["memory_by_zero"]]
    rows = [[cat] + [gib(m[cat]) for m in r["memory_by_zero"].values()]
            for cat in ("weights", "gradients", "optimizer", "zero_buffers", "activations", "transient", "host_offload")]
    rows.append(["total (device)"] + [gib(m["weights"] + m["gradients"] + m["optimizer"] + m["zero_buffers"]
                                          + m["activations"] + m["transient"]) for m in r["memory_by_zero"].values()])
    _table(header, rows)
    print("  peak GiB per device, other settings (same layout and micro-batch):")
    cols = list(next(iter(r["grid"].values())))
    _table(["setting"] + cols, [[k] + ["-" if v is None else gib(v) for v in row.values()] for k, row in r["grid"].items()])
    terms = r["memory"]["terms"]
    print("  one layer's saved activations, MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in terms.items() if v))
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    print(f"  => {verdict}: peak {gib(r['peak_bytes'])} GiB (stage {r['peak_stage']}) of {lay.gpu_memory_gib:g} GiB "
          f"(95% usable); largest micro-batch that fits: {r['largest_micro_batch']}")
    c = r["communication"]
    print(f"  tokens per step {r['tokens_per_step']:,}; training FLOPs per token {r['flops_per_token'] / 1e9:.2f} G; "
          f"step {r['step_s']:.2f} s at MFU {r['mfu']:.2f} of {r['peak_tflops']:g} TFLOP/s "
          f"({r['tokens_per_s'] / 1e3:.0f} k tokens/s)")
    print(f"  sent per rank per step: TP {gib(c['tp'])} GiB, PP {gib(c['pp'])} GiB, DP {gib(c['dp'])} GiB")
    h = r["host_per_node"]
    print(f"  host per node: {gib(h['process_baseline'])} GiB processes (assumed {plan.HOST_BASELINE_GIB:g} per rank), "
          f"{gib(h['offload'])} GiB offloaded state, data order O(1) "
          f"(a materialised permutation would be {gib(h['data_order_before'])} GiB)")


def _table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("    " + "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))))


def print_search(rows: list[dict], limit: int = 15) -> None:
    print(f"\nlayouts that fit ({len(rows)}), fastest first (same MFU; PP bubble and recompute's extra forward counted):")
    header = ["TP", "PP", "DP", "ZeRO", "micro", "recompute", "peak GiB", "step s", "TP+PP+DP GiB sent"]
    table = [[r["layout"].tensor, r["layout"].pipeline, r["layout"].dp, r["layout"].zero, r["layout"].micro_batch,
              "on" if r["layout"].recompute else "off", gib(r["memory"].total), f"{r['step_s']:.2f}",
              gib(sum(r["comm"].values()))] for r in rows[:limit]]
    _table(header, table)


def main(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = build_parser().parse_args(own)
    try:
        cfg = build_config(args.preset, overrides)
        cfg.model.spec()
        if args.vocab_size:
            cfg.model.vocab_size = args.vocab_size
        elif cfg.model.vocab_size is None:
            cfg.model.vocab_size = cfg.data.tokenizer_vocab_size
        lay = layout_from_args(args, cfg)
    except ConfigError as e:
        fail(str(e))
    if min(lay.nodes, lay.gpus_per_node, lay.tensor, lay.pipeline, lay.micro_batch, lay.global_batch) < 1:
        fail("--nodes, --gpus-per-node, --tensor, --pipeline, --micro-batch and --global-batch must be >= 1")
    peak = args.peak_tflops or plan.GPU_PEAK_TFLOPS.get(args.gpu, 1.0)
    r = report(cfg, lay, args.mfu, peak)
    rows = plan.search(plan.ModelShape.from_model_config(cfg.model), lay, r["flops_per_token"], peak, args.mfu) \
        if args.search else []
    if args.json:
        if args.search:
            r["search"] = [{"layout": asdict(x["layout"]), "peak_bytes": x["memory"].total, "step_s": x["step_s"],
                            "communication": x["comm"]} for x in rows]
        print(json.dumps(r, indent=1, default=str))
        return 0
    print_report(r, args.preset)
    if args.search:
        print_search(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
