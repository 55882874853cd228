"""Summaries of the learned entropy parameters (theta, temperature, alpha, beta) for logging.

Each rank fills the slots of the layers and heads it owns into full-size [L, ...] tensors, which
are then reduced over all ranks (SUM for sums, MIN / MAX for extremes) and divided by the number
of data-parallel replicas, so every layout logs the same numbers. Collective: call on all ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _gathered(params):
    """Full parameters even under ZeRO-3 (a no-op for ordinary parameters)."""
    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def parameter_summaries(model, model_cfg, state) -> dict:
    spec = model.spec
    if not (spec.entropy_reg or spec.learnable_temperature or spec.ffn_stabilizer == "scale"):
        return {}
    L, H = model_cfg.num_layers, model_cfg.num_heads
    sums = torch.zeros(L, H + 4, dtype=torch.float64)  # theta[H], t_sum, t_count, alpha, beta
    t_min = torch.full((L,), float("inf"), dtype=torch.float64)
    t_max = torch.full((L,), float("-inf"), dtype=torch.float64)
    layers = [m for m in model.modules() if hasattr(m, "attention") and hasattr(m, "ffn")]
    for layer in layers:
        attn, ffn, i = layer.attention, layer.ffn, layer.layer_number
        with _gathered([attn.theta, attn.temperature, attn.log_temperature, ffn.alpha, ffn.beta]):
            heads = slice(attn.head_offset, attn.head_offset + attn.heads_local)
            if attn.theta is not None:
                sums[i, heads] += attn.theta.detach().double().cpu()
            t = attn.effective_temperature()
            if t is not None:
                t = t.detach().double().cpu()
                sums[i, H] += t.sum()
                sums[i, H + 1] += t.numel()
                t_min[i], t_max[i] = min(t_min[i], t.min()), max(t_max[i], t.max())
            if ffn.alpha is not None and state.tp_rank == 0:  # replicated over TP: count once
                sums[i, H + 2] += float(ffn.alpha.detach())
                sums[i, H + 3] += float(ffn.beta.detach())
    if state.world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(t_min, op=dist.ReduceOp.MIN)
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
        sums /= state.dp_size
    out = {}
    if spec.entropy_reg:
        out["theta"] = sums[:, :H].tolist()
    if spec.learnable_temperature:
        out["temperature_mean"] = (sums[:, H] / sums[:, H + 1].clamp_min(1)).tolist()
        out["temperature_min"], out["temperature_max"] = t_min.tolist(), t_max.tolist()
    if spec.ffn_stabilizer == "scale":
        out["alpha"], out["beta"] = sums[:, H + 2].tolist(), sums[:, H + 3].tolist()
    return out
