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
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_entropy.analysis import plan, plan_speed  # noqa: E402
from megatron_entropy.analysis.cli import OneLineParser, fail, split_overrides  # noqa: E402
from megatron_entropy.analysis.plan_report import GPUS, print_report, print_search, report  # noqa: E402
from megatron_entropy.config import ConfigError, build_config  # noqa: E402



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
        gpu_memory_gib=args.gpu_memory_gib or GPUS[args.gpu], device="cpu" if args.gpu == "cpu" else "cuda",
    )


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
    problem = lay.problem(plan.ModelShape.from_model_config(cfg.model))
    if problem and not args.search:
        fail(f"layout: {problem}; change --nodes / --gpus-per-node / --tensor / --pipeline / --zero / the batch "
             "(or pass --search for the layouts that work)")
    peak = args.peak_tflops or plan.GPU_PEAK_TFLOPS.get(args.gpu, 1.0)
    r = report(cfg, lay, args.mfu, peak)
    rows = plan_speed.search(plan.ModelShape.from_model_config(cfg.model), lay, r["flops_per_token"], peak, args.mfu) \
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
