"""Private-inference (PI) cost accounting: nonlinear op counts, FLOPs, and a fitted 2-party cost model.

Op counts and FLOPs follow the paper's accounting (paper.md section 6.8), which reproduces every
FLOPs entry of Tables 3, 4, 7 and 8:
    softmax: L*H matrices of T x T; LayerNorm: 2L of T x d (the final ln_f is NOT counted, as in
    the paper); activation: L of T x ffn_hidden (none for identity)
    FLOPs_FFN  = 4*T*d*ffn_hidden*L  (= 16*T*d^2*L at ffn_hidden = 4d);  fused d x d: 2*T*d^2*L
    FLOPs_Attn = 8*T*d^2*L + 3*T^2*d*L
Communication and latency have no formula in the paper: they are BumbleBee/SecretFlow measurements.
`fit_cost_model` fits a small per-operation linear model to those 12 distinct published
measurements (non-negative least squares on relative error) and reports in-sample and
leave-one-out errors; see docs/analysis.md for what the fit can and cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

from megatron_entropy.analysis.pi_measured import nnls, relative_nnls  # noqa: F401 (nnls: shared by both fits)
from megatron_entropy.model.variants import BASELINE, VARIANTS, BlockSpec


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    hidden_size: int
    seq_length: int
    ffn_hidden_size: int

    @classmethod
    def from_model_config(cls, model) -> "Shape":
        return cls(model.num_layers, model.num_heads, model.hidden_size, model.seq_length, model.ffn_hidden)

    @classmethod
    def gpt2(cls, num_layers: int = 12, seq_length: int = 128) -> "Shape":
        """GPT-2 small (d=768, 12 heads, FFN 3072), the shape of every PI table of the paper."""
        return cls(num_layers, 12, 768, seq_length, 3072)


# ----------------------------------------------------------------------------- op counts, FLOPs

@dataclass(frozen=True)
class NonlinearOps:
    """What a forward pass over T tokens computes nonlinearly (the paper's 'Nonlinear ops' column)."""

    softmax: int  # matrices of T x T
    layernorm: int  # matrices of T x d
    activation: str | None  # "gelu" / "relu", None for identity
    activations: int  # matrices of T x ffn_hidden
    final_norm: bool  # the model has ln_f (never counted, following the paper; ambiguity A9)
    shape: Shape

    @property
    def elements(self) -> dict[str, int]:
        s = self.shape
        return {
            "softmax": self.softmax * s.seq_length ** 2,
            "layernorm": self.layernorm * s.seq_length * s.hidden_size,
            "gelu": self.activations * s.seq_length * s.ffn_hidden_size if self.activation == "gelu" else 0,
            "relu": self.activations * s.seq_length * s.ffn_hidden_size if self.activation == "relu" else 0,
        }

    def describe(self) -> str:
        """e.g. 'SM 144xR^{128x128}; LN 24xR^{128x768}; G 12xR^{128x3072}' as in Table 3."""
        T, d = self.shape.seq_length, self.shape.hidden_size
        parts = [f"SM {self.softmax}xR^{{{T}x{T}}}"]
        if self.layernorm:
            parts.append(f"LN {self.layernorm}xR^{{{T}x{d}}}")
        if self.activation:
            parts.append(f"{self.activation[0].upper()} {self.activations}xR^{{{T}x{self.shape.ffn_hidden_size}}}")
        return "; ".join(parts)


def nonlinear_ops(spec: BlockSpec, shape: Shape) -> NonlinearOps:
    L = shape.num_layers
    active = spec.activation if spec.activation != "identity" else None
    return NonlinearOps(
        softmax=L * shape.num_heads,
        layernorm=2 * L if spec.norm == "layernorm" else 0,
        activation=active,
        activations=L if active else 0,
        final_norm=spec.final_norm,
        shape=shape,
    )


def ffn_flops(spec: BlockSpec, shape: Shape) -> int:
    T, d, L = shape.seq_length, shape.hidden_size, shape.num_layers
    if spec.ffn_kind == "fused":
        return 2 * T * d * d * L
    return 4 * T * d * shape.ffn_hidden_size * L  # two matmuls of 2*T*d*ffn_hidden FLOPs each


def attention_flops(shape: Shape) -> int:
    T, d, L = shape.seq_length, shape.hidden_size, shape.num_layers
    return 8 * T * d * d * L + 3 * T * T * d * L  # Q, K, V, O projections + scores and context


def format_flops(flops: float) -> str:
    """14495514624 -> '14.5B', the paper's printed convention.

    The paper rounds to 0.01B first and then to 0.1B, half up: the fused FFN at T=512 is
    7.2478B, printed 7.3B (via 7.25B; plain rounding gives 7.2B). Every other entry of Tables 3,
    4, 7, 8 comes out the same either way. Below 1B FLOPs: millions ('12.6M').
    """
    if flops < 1e9:
        return f"{flops / 1e6:.1f}M"
    hundredths = Decimal(flops / 1e9).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{hundredths.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}B"


# ----------------------------------------------------------------------------- published numbers

@dataclass(frozen=True)
class Published:
    table: str
    variant: str
    num_layers: int
    seq_length: int
    comm_gb: float
    latency_min: float
    ffn_flops: str
    attention_flops: str

    @property
    def shape(self) -> Shape:
        return Shape.gpt2(self.num_layers, self.seq_length)


def _table(table, L, T, ffn, ffn_fused, attn, rows):
    names = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)")
    flops = (ffn, ffn, ffn_fused, ffn_fused)
    return [Published(table, n, L, T, c, t, f, attn) for n, (c, t), f in zip(names, rows, flops)]


# Tables 3, 4, 7, 8 of the paper (GPT-2 small shape; BumbleBee 2PC, one output token for T inputs).
PUBLISHED: list[Published] = [
    *_table("3", 12, 128, "14.5B", "1.8B", "7.7B", [(25.32, 8.21), (9.44, 6.06), (6.43, 4.76), (6.43, 4.76)]),
    *_table("4", 12, 512, "58.0B", "7.3B", "36.2B", [(145.24, 30.74), (81.71, 23.54), (69.68, 19.44), (69.68, 19.44)]),
    *_table("7", 12, 256, "29.0B", "3.6B", "16.3B", [(58.51, 16.57), (26.73, 12.59), (20.72, 10.45), (20.72, 10.45)]),
    *_table("8", 18, 128, "21.7B", "2.7B", "11.6B", [(37.17, 10.77), (13.34, 8.04), (8.83, 6.07), (8.83, 6.07)]),
]
# Not used in the fit: AERO's unfused scaled FFN at T=128 (paper.md S7, secondary source).
HELD_OUT = [Published("AERO", "SM+ScFFN", 12, 128, 6.95, 5.68, "14.5B", "7.7B")]


# ----------------------------------------------------------------------------- cost model

# Why these features: in the published data d, H and the FFN width never vary, so anything that
# scales with T*d per layer is collinear. In particular every ReLU model also has LayerNorm in a
# fixed 2:1 element ratio, so LN and ReLU per-element costs cannot be told apart: they share one
# coefficient (an assumption for LN-free ReLU or activation-free LN models). The T^2 score/context
# matmuls are collinear with the softmax elements and are absorbed by that coefficient.
FEATURES = ("softmax", "gelu", "layernorm_relu", "linear_flops", "tokens", "constant")
FEATURE_HELP = {
    "softmax": "softmax elements L*H*T^2 (also carries the T^2 attention matmuls)",
    "gelu": "GELU elements L*T*ffn_hidden",
    "layernorm_relu": "LayerNorm elements 2L*T*d + ReLU elements L*T*ffn_hidden (one shared per-element cost)",
    "linear_flops": "FLOPs of the weight matmuls: Q,K,V,O (8*T*d^2*L) + FFN",
    "tokens": "T (per-token work outside the blocks: embedding, final norm)",
    "constant": "1 (fixed cost: setup, output projection of one token)",
}


def cost_features(spec: BlockSpec, shape: Shape) -> dict[str, float]:
    ops = nonlinear_ops(spec, shape).elements
    T, d, L = shape.seq_length, shape.hidden_size, shape.num_layers
    return {
        "softmax": ops["softmax"],
        "gelu": ops["gelu"],
        "layernorm_relu": ops["layernorm"] + ops["relu"],
        "linear_flops": 8 * T * d * d * L + ffn_flops(spec, shape),
        "tokens": T,
        "constant": 1,
    }


def _fit_coefficients(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return relative_nnls(X, y)


@dataclass
class CostModel:
    comm: dict[str, float]  # GB per unit of each feature
    latency: dict[str, float]  # minutes per unit of each feature

    def estimate(self, spec: BlockSpec, shape: Shape) -> tuple[float, float]:
        """(communication GB, latency minutes) for one output token given T input tokens."""
        f = cost_features(spec, shape)
        return (sum(self.comm[k] * f[k] for k in FEATURES), sum(self.latency[k] * f[k] for k in FEATURES))


def _distinct(rows: list[Published]) -> list[Published]:
    """One row per measurement: the EReg rows repeat the SM+ScFuFFN measurement (same ops)."""
    seen, out = set(), []
    for row in rows:
        key = (tuple(cost_features(VARIANTS[row.variant], row.shape).values()), row.comm_gb, row.latency_min)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def fit_cost_model(rows: list[Published] | None = None) -> CostModel:
    rows = _distinct(rows if rows is not None else PUBLISHED)
    X = np.array([[cost_features(VARIANTS[r.variant], r.shape)[k] for k in FEATURES] for r in rows], dtype=float)
    comm = _fit_coefficients(X, np.array([r.comm_gb for r in rows]))
    latency = _fit_coefficients(X, np.array([r.latency_min for r in rows]))
    return CostModel(dict(zip(FEATURES, comm.tolist())), dict(zip(FEATURES, latency.tolist())))


def fit_report(rows: list[Published] | None = None) -> dict:
    """Coefficients and, for every published row, the estimate, its relative error and the
    leave-one-out relative error (the measurement refitted without that configuration)."""
    rows = rows if rows is not None else PUBLISHED
    model = fit_cost_model(rows)
    distinct = _distinct(rows)
    out_rows = []
    for row in rows + HELD_OUT:
        spec = VARIANTS[row.variant]
        comm, lat = model.estimate(spec, row.shape)
        held_out = row in HELD_OUT
        loo_model = model if held_out else fit_cost_model([r for r in distinct if _same_measurement(r, row) is False])
        loo_comm, loo_lat = loo_model.estimate(spec, row.shape)
        out_rows.append({
            "table": row.table, "variant": row.variant, "num_layers": row.num_layers,
            "seq_length": row.seq_length, "in_fit": not held_out,
            "comm_gb": row.comm_gb, "comm_est": comm, "comm_err": comm / row.comm_gb - 1,
            "comm_loo_err": loo_comm / row.comm_gb - 1,
            "latency_min": row.latency_min, "latency_est": lat, "latency_err": lat / row.latency_min - 1,
            "latency_loo_err": loo_lat / row.latency_min - 1,
        })
    fitted = [r for r in out_rows if r["in_fit"]]
    summary = {
        f"{metric}_{kind}_abs_{stat}": fn([abs(r[f"{metric}_{kind}"]) for r in fitted])
        for metric in ("comm", "latency") for kind in ("err", "loo_err")
        for stat, fn in (("mean", lambda v: float(np.mean(v))), ("max", lambda v: float(np.max(v))))
    }
    return {
        "features": {k: FEATURE_HELP[k] for k in FEATURES},
        "comm_coefficients": model.comm, "latency_coefficients": model.latency,
        "measurements": len(distinct), "parameters": len(FEATURES),
        "rows": out_rows, "summary": summary,
    }


def _same_measurement(a: Published, b: Published) -> bool:
    same_ops = cost_features(VARIANTS[a.variant], a.shape) == cost_features(VARIANTS[b.variant], b.shape)
    return same_ops and (a.comm_gb, a.latency_min) == (b.comm_gb, b.latency_min)


# ----------------------------------------------------------------------------- one config

def cost_row(variant: str, spec: BlockSpec, shape: Shape, model: CostModel, baseline: tuple[float, float]) -> dict:
    """One row of the paper-style table; savings are against SM+LN+G of the same shape."""
    ops = nonlinear_ops(spec, shape)
    comm, lat = model.estimate(spec, shape)
    return {
        "variant": variant,
        "nonlinear_ops": ops.describe(),
        "nonlinear_elements": ops.elements,
        "final_norm": "yes" if ops.final_norm else "no",
        "ffn_flops": ffn_flops(spec, shape), "attention_flops": attention_flops(shape),
        "ffn_flops_str": format_flops(ffn_flops(spec, shape)),
        "attention_flops_str": format_flops(attention_flops(shape)),
        "comm_gb_est": comm, "latency_min_est": lat,
        "comm_saving": baseline[0] / comm if comm > 0 else float("inf"),
        "latency_saving": baseline[1] / lat if lat > 0 else float("inf"),
    }


def shape_report(shape: Shape, variants: list[tuple[str, BlockSpec]], model: CostModel | None = None) -> list[dict]:
    model = model or fit_cost_model()
    baseline = model.estimate(VARIANTS[BASELINE], shape)
    return [cost_row(name, spec, shape, model, baseline) for name, spec in variants]


# ----------------------------------------------------------------------------- measured mode

GPT2_VOCAB = 50257


def measured_arch(spec: BlockSpec, shape: Shape, vocab_size: int = GPT2_VOCAB):
    from megatron_entropy.analysis import pi_measured

    return pi_measured.Arch.from_spec(spec, shape.num_layers, shape.num_heads, shape.hidden_size,
                                      shape.ffn_hidden_size, vocab_size)


def measured_row(variant: str, spec: BlockSpec, shape: Shape, coefficients: dict, baseline: dict | None,
                 vocab_size: int = GPT2_VOCAB, bandwidth_mbps: float = 100.0, rtt_ms: float = 80.0) -> dict:
    """One row of the paper-style table from the measured per-operation costs (analysis/pi_measured.py)."""
    from megatron_entropy.analysis import pi_measured

    est = pi_measured.estimate(coefficients, measured_arch(spec, shape, vocab_size), shape.seq_length,
                               bandwidth_mbps * 1e6, rtt_ms / 1e3)
    t = est["total"]
    row = cost_row(variant, spec, shape, CostModel(dict.fromkeys(FEATURES, 0.0), dict.fromkeys(FEATURES, 0.0)),
                   (1.0, 1.0))
    row.update({"comm_gb_est": t["bytes"] / 1e9, "latency_min_est": t["latency_s"] / 60,
                "send_actions_est": t["actions"], "compute_min_est": t["seconds"] / 60,
                "transfer_min_est": 8 * t["bytes"] / (bandwidth_mbps * 1e6) / 60,
                "rounds_min_est": t["actions"] * rtt_ms / 1e3 / 60,
                "comm_gb_by_class": {k: v["bytes"] / 1e9 for k, v in est["by_class"].items()}})
    base = baseline or row
    row["comm_saving"] = base["comm_gb_est"] / row["comm_gb_est"]
    row["latency_saving"] = base["latency_min_est"] / row["latency_min_est"]
    return row


def measured_shape_report(shape: Shape, variants: list[tuple[str, BlockSpec]], coefficients: dict,
                          vocab_size: int = GPT2_VOCAB, **network) -> list[dict]:
    baseline = measured_row(BASELINE, VARIANTS[BASELINE], shape, coefficients, None, vocab_size, **network)
    return [measured_row(n, s, shape, coefficients, baseline, vocab_size, **network) for n, s in variants]


def measured_vs_paper(coefficients: dict, **network) -> dict:
    """The measured model extrapolated to every published GPT-2 configuration, with its error."""
    rows = []
    for row in PUBLISHED + HELD_OUT:
        est = measured_row(row.variant, VARIANTS[row.variant], row.shape, coefficients, None, GPT2_VOCAB, **network)
        rows.append({"table": row.table, "variant": row.variant, "num_layers": row.num_layers,
                     "seq_length": row.seq_length, "in_fit": False,
                     "comm_gb": row.comm_gb, "comm_est": est["comm_gb_est"], "comm_err": est["comm_gb_est"] / row.comm_gb - 1,
                     "latency_min": row.latency_min, "latency_est": est["latency_min_est"],
                     "latency_err": est["latency_min_est"] / row.latency_min - 1,
                     "transfer_min_est": est["transfer_min_est"], "rounds_min_est": est["rounds_min_est"],
                     "compute_min_est": est["compute_min_est"]})
    published = [r for r in rows if r["table"] != "AERO"]
    summary = {f"{m}_err_abs_{stat}": fn([abs(r[f"{m}_err"]) for r in published])
               for m in ("comm", "latency") for stat, fn in (("mean", lambda v: float(np.mean(v))),
                                                              ("max", lambda v: float(np.max(v))))}
    return {"rows": rows, "summary": summary}
