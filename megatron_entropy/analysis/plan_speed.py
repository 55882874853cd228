"""Step time, communication per step and the layout search of the planner (analysis/plan.py).

Pure arithmetic like plan.py. Step time = model FLOPs / (devices x peak x MFU), with recompute's
extra forward, the pipeline bubble, and the communication that is not overlapped, at stated
bandwidths; the MFU itself is an assumption until a GPU run measures it (docs/planning.md).
"""

from __future__ import annotations

from dataclasses import replace

from megatron_entropy.analysis.plan import BYTES, GIB, Layout, ModelShape, peak_memory, stage_layers, stage_params

# Per-device bandwidths for the exposed-communication estimate (stated assumptions, GB/s): NVLink
# all-reduce bus bandwidth inside an H100/H200 node, and one 400 Gb/s NIC per GPU between nodes.
INTRA_NODE_GBPS = 300.0
INTER_NODE_GBPS = 40.0


def step_time_s(flops_per_token: float, lay: Layout, seq: int, peak_tflops: float, mfu: float) -> float:
    tokens = lay.global_batch * seq
    return flops_per_token * tokens / (lay.world * peak_tflops * 1e12 * mfu)


def communication_bytes(m: ModelShape, lay: Layout) -> dict[str, int]:
    """Bytes each rank sends per optimizer step (ring collectives: an all-reduce sends
    2 (n-1)/n of the buffer, a reduce-scatter or all-gather (n-1)/n)."""
    a, s, d = BYTES[lay.precision], lay.micro_batch * m.seq, m.hidden
    micro = lay.accumulation
    layers = max(stage_layers(m, lay.tensor, lay.pipeline, lay.partition))
    tp = lay.tensor
    tp_bytes = 0
    if tp > 1:  # per layer: forward all-reduce after o and after the FFN, two in the backward
        passes = 6 if lay.recompute else 4
        ring = 2 * (tp - 1) / tp
        tp_bytes = int(micro * (layers * passes + 2) * s * d * a * ring)
    pp_bytes = 2 * micro * s * d * a if lay.pipeline > 1 else 0  # activations out, gradients back
    n = max(stage_params(m, lay.tensor, lay.pipeline, lay.partition))
    dp, frac = lay.dp, (lay.dp - 1) / lay.dp if lay.dp > 1 else 0.0
    g = a if lay.precision != "fp32" else 4
    if lay.zero == 0:
        dp_bytes = 2 * frac * n * g
    elif lay.zero in (1, 2):
        dp_bytes = frac * n * g + frac * n * a  # reduce-scatter gradients, all-gather updated weights
    else:
        dp_bytes = frac * n * g + 2 * frac * n * a * micro  # + a parameter all-gather per forward and backward
    return {"tp": tp_bytes, "pp": pp_bytes, "dp": int(dp_bytes)}


def step_estimate(m: ModelShape, lay: Layout, flops_per_token: float, peak_tflops: float, mfu: float) -> dict:
    """Seconds per optimizer step: compute at `mfu` (+1/3 with recompute, / (1 - bubble) with PP),
    plus communication that is not overlapped (TP collectives sit on the critical path; our
    DeepSpeed configs set overlap_comm false, so the DP traffic is exposed too)."""
    compute = step_time_s(flops_per_token, lay, m.seq, peak_tflops, mfu)
    if lay.recompute:
        compute *= 4 / 3
    bubble = (lay.pipeline - 1) / (lay.accumulation + lay.pipeline - 1) if lay.pipeline > 1 else 0.0
    compute /= 1 - bubble
    comm = communication_bytes(m, lay)
    # TP groups sit inside a node; DP (and PP) spans nodes as soon as the job has more than one.
    across = INTER_NODE_GBPS if lay.nodes > 1 else INTRA_NODE_GBPS
    seconds = {"tp": comm["tp"] / (INTRA_NODE_GBPS * 1e9), "pp": comm["pp"] / (across * 1e9),
               "dp": comm["dp"] / (across * 1e9)}
    return {"compute_s": compute, "bubble": bubble, "comm_s": seconds, "step_s": compute + sum(seconds.values())}


# ----------------------------------------------------------------------------- search

def search(m: ModelShape, base: Layout, flops_per_token: float, peak_tflops: float, mfu: float) -> list[dict]:
    """For every (TP, PP, ZeRO, recompute) of base's devices, the largest power-of-two micro-batch
    that fits (and divides the global batch), fastest first by step_estimate."""
    rows = []
    tps = [t for t in (1, 2, 4, 8) if t <= base.gpus_per_node and m.heads % t == 0]
    pps = [p for p in (1, 2, 4, 8) if p <= m.layers]
    for tp in tps:
        for pp in pps:
            for zero in (0, 1, 2, 3):
                for recompute in (False, True):
                    best = None
                    for b in (1, 2, 4, 8, 16, 32, 64):
                        lay = replace(base, tensor=tp, pipeline=pp, zero=zero, recompute=recompute, micro_batch=b,
                                      offload=False)
                        if lay.problem(m):
                            continue
                        mem = peak_memory(m, lay)[1]
                        if mem.total <= lay.gpu_memory_gib * GIB * 0.95:
                            best = (lay, mem)
                    if best:
                        lay, mem = best
                        est = step_estimate(m, lay, flops_per_token, peak_tflops, mfu)
                        rows.append({"layout": lay, "memory": mem, "comm": communication_bytes(m, lay), **est})
    rows.sort(key=lambda r: (r["step_s"], r["memory"].total))
    return rows
