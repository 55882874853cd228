"""The planner's report of one layout (numbers and tables): shared by tools/plan.py and train.py --dry-run."""

from __future__ import annotations

from dataclasses import asdict, replace

from megatron_entropy.analysis import plan, plan_speed
from megatron_entropy.analysis.flops import training_flops_per_token

# nvidia-smi's total memory of each part, in GiB.
GPUS = {"h100": 79.6, "h200": 140.4, "a100": 79.2, "cpu": 24.0}


def gib(n: float) -> str:
    return f"{n / plan.GIB:.2f}"


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
    est = plan_speed.step_estimate(m, lay, flops, peak, mfu)
    step = est["step_s"]
    return {
        "layout": asdict(lay), "problem": lay.problem(m), "params_total": plan.total_params(m),
        "params_per_rank_by_stage": plan.stage_params(m, lay.tensor, lay.pipeline, lay.partition),
        "layers_by_stage": plan.stage_layers(m, lay.tensor, lay.pipeline, lay.partition),
        "peak_stage": stage, "memory": asdict(mem), "peak_bytes": mem.total, "memory_by_zero": by_zero, "grid": grid,
        "fits": mem.total <= lay.gpu_memory_gib * plan.GIB * 0.95,
        "largest_micro_batch": plan.largest_micro_batch(m, lay),
        "tokens_per_step": lay.global_batch * m.seq, "flops_per_token": flops,
        "mfu": mfu, "peak_tflops": peak, "step_s": step, "step": est, "tokens_per_s": lay.global_batch * m.seq / step,
        "communication": plan_speed.communication_bytes(m, lay),
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
            for cat in ("weights", "gradients", "optimizer", "zero_buffers", "activations", "transient",
                        "not_coexisting", "host_offload")]
    rows.append(["peak (device)"] + [gib(m["weights"] + m["gradients"] + m["optimizer"] + m["zero_buffers"]
                                         + m["activations"] + m["transient"] - m["not_coexisting"])
                                     for m in r["memory_by_zero"].values()])
    _table(header, rows)
    print("  peak GiB per device, other settings (same layout and micro-batch):")
    cols = list(next(iter(r["grid"].values())))
    _table(["setting"] + cols,
           [[k] + ["-" if v is None else gib(v) for v in row.values()] for k, row in r["grid"].items()])
    terms = r["memory"]["terms"]
    print("  one layer's saved activations, MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in terms.items() if v))
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    print(f"  => {verdict}: peak {gib(r['peak_bytes'])} GiB (stage {r['peak_stage']}) of {lay.gpu_memory_gib:g} GiB "
          f"(95% usable); largest micro-batch that fits: {r['largest_micro_batch']}")
    c = r["communication"]
    st = r["step"]
    print(f"  tokens per step {r['tokens_per_step']:,}; training FLOPs per token {r['flops_per_token'] / 1e9:.2f} G; "
          f"step {r['step_s']:.2f} s ({r['tokens_per_s'] / 1e3:.0f} k tokens/s): compute {st['compute_s']:.2f} s at "
          f"MFU {r['mfu']:.2f} of {r['peak_tflops']:g} TFLOP/s, exposed communication TP {st['comm_s']['tp']:.2f} s "
          f"+ DP {st['comm_s']['dp']:.2f} s + PP {st['comm_s']['pp']:.2f} s (at {plan_speed.INTRA_NODE_GBPS:g} GB/s in a "
          f"node, {plan_speed.INTER_NODE_GBPS:g} GB/s across)")
    print(f"  sent per rank per step: TP {gib(c['tp'])} GiB, PP {gib(c['pp'])} GiB, DP {gib(c['dp'])} GiB")
    h = r["host_per_node"]
    print(f"  host per node: {gib(h['process_baseline'])} GiB processes (assumed {plan.HOST_BASELINE_GIB:g} per rank), "
          f"{gib(h['offload'])} GiB offloaded state, {gib(h['model_build'])} GiB while building the model (fp32), "
          f"data order O(1) "
          f"(a materialised permutation would be {gib(h['data_order_before'])} GiB)")


def _table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        cells = (str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
        print("    " + "  ".join(cells))


def print_search(rows: list[dict], limit: int = 15) -> None:
    print(f"\nlayouts that fit ({len(rows)}; each with its largest micro-batch), fastest first (one MFU for all; "
          "PP bubble, recompute's extra forward and exposed communication counted):")
    header = ["TP", "PP", "DP", "ZeRO", "micro", "recompute", "peak GiB", "step s", "comm s", "TP+PP+DP GiB sent"]
    table = [[r["layout"].tensor, r["layout"].pipeline, r["layout"].dp, r["layout"].zero, r["layout"].micro_batch,
              "on" if r["layout"].recompute else "off", gib(r["memory"].total), f"{r['step_s']:.2f}",
              f"{sum(r['comm_s'].values()):.2f}",
              gib(sum(r["comm"].values()))] for r in rows[:limit]]
    _table(header, table)
