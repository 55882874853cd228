"""Measured private-inference cost: what one forward computes, stage by stage, and a cost model
fitted to SPU measurements of those stages (tools/pi_measure.py --study).

Pure Python + numpy: the training environment (tools/pi_cost.py --measured) and the PI
environment (.venv-pi, tools/pi_measure.py) both import it; it must never import torch, jax or spu.

The unit is the paper's: one output token given T input tokens, including the input embedding and
the final vocabulary projection. `op_inventory` lists the forward's stages; each stage belongs to one
operation class and carries the dimensions its cost depends on. The fit gives every class a few
non-negative per-unit costs (bytes, send actions, seconds), so a cost extrapolates to any shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATMUL_CLASSES = ("embedding", "linear", "attention_matmul", "head")
ELEMENTWISE_CLASSES = ("temperature", "softmax_max", "softmax_exp", "softmax_normalize", "layernorm", "gelu",
                       "relu", "scale")
CLASSES = MATMUL_CLASSES + ELEMENTWISE_CLASSES + ("setup",)
# What the report groups the classes into (the issue's / paper's vocabulary).
GROUPS = {"embedding": "embedding/head", "head": "embedding/head", "linear": "matmul", "attention_matmul": "matmul",
          "temperature": "softmax", "softmax_max": "softmax", "softmax_exp": "softmax",
          "softmax_normalize": "softmax", "layernorm": "layernorm", "gelu": "gelu/relu", "relu": "gelu/relu",
          "scale": "matmul", "setup": "setup"}
COEFFICIENTS_FILE = Path(__file__).with_name("pi_measured_cheetah.json")


@dataclass(frozen=True)
class Arch:
    """The inference-time architecture of a folded export (what PI cost depends on)."""

    num_layers: int
    num_heads: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    norm: str = "layernorm"  # or "none"
    activation: str = "gelu"  # "gelu" / "relu" / "identity"
    ffn_kind: str = "two_layer"  # or "fused"
    temperature: bool = False  # a per-head, per-position query scale (SM(t)): a secret elementwise product
    final_norm: bool = True
    residual_scale: bool = False  # beta kept as a per-layer residual scale (not folded)

    @classmethod
    def from_spec(cls, spec, num_layers, num_heads, hidden_size, ffn_hidden_size, vocab_size) -> "Arch":
        """From a model.variants.BlockSpec (folded: beta is folded whenever no LayerNorm follows)."""
        scaled = spec.ffn_stabilizer == "scale"
        return cls(num_layers, num_heads, hidden_size, ffn_hidden_size, vocab_size, spec.norm, spec.activation,
                   spec.ffn_kind, spec.learnable_temperature, spec.final_norm,
                   scaled and not (spec.norm == "none" and not spec.final_norm))


@dataclass(frozen=True)
class Op:
    name: str  # e.g. "layer0.softmax_exp"
    op_class: str
    layer: int  # -1 outside the blocks
    role: str  # which computation (tools/pi_measure's stage builder dispatches on it)
    dims: dict  # matmul: batch, m, k, n; elementwise: batch, rows, width


def op_inventory(arch: Arch, T: int) -> list[Op]:
    """Every stage of the forward for one output token given T tokens, in execution order."""
    d, H, f, V = arch.hidden_size, arch.num_heads, arch.ffn_hidden_size, arch.vocab_size
    dk = d // H
    ops = [Op("embedding", "embedding", -1, "embedding", dict(batch=1, m=T, k=V, n=d))]

    def add(layer, op_class, role, **dims):
        ops.append(Op(f"layer{layer}.{role}", op_class, layer, role, dims))

    for i in range(arch.num_layers):
        if arch.norm == "layernorm":
            add(i, "layernorm", "ln1", batch=1, rows=T, width=d)
        add(i, "linear", "qkv", batch=1, m=T, k=d, n=3 * d)
        if arch.temperature:
            add(i, "temperature", "temperature", batch=H, rows=T, width=dk)
        add(i, "attention_matmul", "scores", batch=H, m=T, k=dk, n=T)
        for part in ("softmax_max", "softmax_exp", "softmax_normalize"):
            add(i, part, part, batch=H, rows=T, width=T)
        add(i, "attention_matmul", "context", batch=H, m=T, k=T, n=dk)
        add(i, "linear", "o", batch=1, m=T, k=d, n=d)
        if arch.norm == "layernorm":
            add(i, "layernorm", "ln2", batch=1, rows=T, width=d)
        if arch.ffn_kind == "fused":
            add(i, "linear", "ffn_fc", batch=1, m=T, k=d, n=d)
        else:
            add(i, "linear", "ffn_in", batch=1, m=T, k=d, n=f)
            if arch.activation != "identity":
                add(i, arch.activation, "activation", batch=1, rows=T, width=f)
            add(i, "linear", "ffn_out", batch=1, m=T, k=f, n=d)
        if arch.residual_scale:
            add(i, "scale", "beta", batch=1, rows=T, width=d)
    if arch.final_norm:
        ops.append(Op("final_norm", "layernorm", -1, "final_norm", dict(batch=1, rows=1, width=d)))
    ops.append(Op("head", "head", -1, "head", dict(batch=1, m=1, k=d, n=V)))
    return ops


# ----------------------------------------------------------------------------- cost model

def features(op_class: str, dims: dict) -> dict[str, float]:
    """What a stage's bytes / send actions / seconds are linear in.

    Matmuls (both operands secret): the input and weight sizes, the output size, and one per call.
    Elementwise classes: elements, rows (per-row work: max, sum, reciprocal, mean, rsqrt) and calls.
    Send actions also get rows-independent log2(width) per call (tree reductions: the row max).
    """
    b = dims.get("batch", 1)
    if op_class in MATMUL_CLASSES:
        m, k, n = dims["m"], dims["k"], dims["n"]
        return {"mk": b * m * k, "kn": b * k * n, "mn": b * m * n, "calls": 1.0, "log_width": math.log2(max(k, 2))}
    if op_class == "setup":
        return {"calls": 1.0}
    rows, width = b * dims["rows"], dims["width"]
    return {"elements": rows * width, "rows": rows, "calls": 1.0, "log_width": math.log2(max(width, 2))}


FEATURES = {"bytes": {"matmul": ("mk", "kn", "mn", "calls"), "elementwise": ("elements", "rows", "calls")},
            "actions": {"matmul": ("calls", "log_width"), "elementwise": ("calls", "log_width")},
            "seconds": {"matmul": ("mk", "kn", "mn", "calls"), "elementwise": ("elements", "rows", "calls")}}


def _kind(op_class: str) -> str:
    return "matmul" if op_class in MATMUL_CLASSES else "elementwise"


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """min ||A x - b|| subject to x >= 0 (Lawson-Hanson active set; scipy is not a dependency)."""
    n = A.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(max_iter):
        gradient = A.T @ (b - A @ x)
        if passive.all() or gradient[~passive].max() <= 1e-12 * max(1.0, np.abs(gradient).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:  # solve on the passive set; step back until every passive coefficient is > 0
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocking = passive & (z <= 0)
            step = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + step * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def relative_nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS on relative error: rows divided by the measurement, columns scaled to unit max."""
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    return nnls((X / scale) / y[:, None], np.ones_like(y)) / scale


def fit(rows: list[dict]) -> dict:
    """Per class and metric, non-negative coefficients minimising the relative error.

    rows: measured stages {"op_class", "dims", "bytes", "actions", "seconds"}. One matmul model is
    shared by all matmul classes (same protocol primitive); every elementwise class has its own."""
    model: dict = {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = "matmul" if row["op_class"] in MATMUL_CLASSES else row["op_class"]
        groups.setdefault(key, []).append(row)
    for key, members in groups.items():
        kind = "matmul" if key == "matmul" else ("setup" if key == "setup" else "elementwise")
        model[key] = {}
        for metric in ("bytes", "actions", "seconds"):
            names = ("calls",) if kind == "setup" else FEATURES[metric][kind]
            X = np.array([[features(r["op_class"], r["dims"])[n] for n in names] for r in members], dtype=float)
            y = np.array([max(float(r[metric]), 1e-12) for r in members])
            coef = relative_nnls(X, y)
            model[key][metric] = dict(zip(names, coef.tolist()))
    return model


def stage_estimate(model: dict, op_class: str, dims: dict) -> dict[str, float]:
    key = "matmul" if op_class in MATMUL_CLASSES else op_class
    if key not in model:
        raise KeyError(f"no measured coefficients for operation class {op_class!r}")
    f = features(op_class, dims)
    return {metric: sum(c * f[n] for n, c in model[key][metric].items()) for metric in ("bytes", "actions", "seconds")}


def estimate(model: dict, arch: Arch, T: int, bandwidth_bps: float = 100e6, rtt_s: float = 0.080,
             with_setup: bool = True) -> dict:
    """Bytes, send actions, compute seconds and modelled latency of one forward, by class."""
    by_class: dict[str, dict[str, float]] = {}
    ops = [(op.op_class, op.dims) for op in op_inventory(arch, T)]
    if with_setup and "setup" in model:
        ops.append(("setup", {}))
    for op_class, dims in ops:
        cost = stage_estimate(model, op_class, dims)
        acc = by_class.setdefault(op_class, {"bytes": 0.0, "actions": 0.0, "seconds": 0.0})
        for k, v in cost.items():
            acc[k] += v
    total = {k: sum(c[k] for c in by_class.values()) for k in ("bytes", "actions", "seconds")}
    total["latency_s"] = latency(total["bytes"], total["actions"], total["seconds"], bandwidth_bps, rtt_s)
    return {"total": total, "by_class": by_class}


def latency(nbytes: float, rounds: float, compute_s: float, bandwidth_bps: float, rtt_s: float) -> float:
    """latency = compute + bytes / bandwidth + rounds x RTT (bytes counted in both directions)."""
    return compute_s + 8.0 * nbytes / bandwidth_bps + rounds * rtt_s


def load_coefficients(path: Path | str | None = None) -> dict:
    path = Path(path) if path else COEFFICIENTS_FILE
    return json.loads(path.read_text())
