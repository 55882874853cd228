"""The paper's named architecture variants, as block specs.

One registry serves training (the model is built from a BlockSpec), FLOP / private-inference
accounting (analysis/pi_cost.py reads the same spec), checkpoint metadata and Hugging Face export.

Names follow the paper (Table 1 and Section 4): SM = softmax attention, LN = LayerNorm,
G = GELU, R = ReLU, ScFuFFN = scaled (alpha, beta) fused d x d FFN, SM(t) = learnable per-head,
per-position softmax temperature, EReg(...) = trained with the entropy regulariser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

NORMS = ("layernorm", "none")
ACTIVATIONS = ("gelu", "relu", "identity")
FFN_KINDS = ("two_layer", "fused")
STABILIZERS = ("none", "weight_norm", "spectral_norm", "scale")
# Table 5: which linear layers weight/spectral normalisation is applied to.
PLACEMENTS = ("FFN", "QK", "QK+FFN", "QKV+FFN", "QKVO+FFN")


@dataclass(frozen=True)
class BlockSpec:
    """Everything that distinguishes one variant's decoder block from another's."""

    norm: str = "layernorm"  # LayerNorm before attention and FFN, or none (identity)
    activation: str = "gelu"  # FFN nonlinearity
    ffn_kind: str = "two_layer"  # d -> 4d -> d, or the fused single d x d map
    ffn_stabilizer: str = "none"  # what replaces LayerNorm against entropy collapse
    stabilizer_placement: str = "FFN"  # where weight/spectral norm applies (Table 5)
    final_norm: bool = True  # the final LayerNorm before the LM head (ambiguity A9)
    learnable_temperature: bool = False  # SM(t)
    entropy_reg: bool = False  # EReg(...)

    def validate(self) -> None:
        for name, allowed in (
            ("norm", NORMS),
            ("activation", ACTIVATIONS),
            ("ffn_kind", FFN_KINDS),
            ("ffn_stabilizer", STABILIZERS),
            ("stabilizer_placement", PLACEMENTS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")
        if self.ffn_kind == "fused" and self.activation != "identity":
            raise ValueError(
                f"model.ffn_kind=fused needs model.activation=identity (got {self.activation!r}): "
                "only a linear FFN can be fused into one d x d matrix"
            )

    @property
    def normalized_linears(self) -> frozenset[str]:
        """Names of the linear layers that weight/spectral norm is applied to."""
        if self.ffn_stabilizer not in ("weight_norm", "spectral_norm"):
            return frozenset()
        parts = {"FFN": {"ffn"}, "QK": {"q", "k"}, "QKV": {"q", "k", "v"}, "QKVO": {"q", "k", "v", "o"}}
        names: set[str] = set()
        for part in self.stabilizer_placement.split("+"):
            names |= parts[part]
        return frozenset(names)

    @property
    def nonlinearities(self) -> tuple[str, ...]:
        """The nonlinear operations a decoder block performs (what private inference pays for)."""
        ops = ["softmax"]
        if self.norm == "layernorm":
            ops.append("layernorm")
        if self.activation != "identity":
            ops.append(self.activation)
        return tuple(ops)

    def to_dict(self) -> dict:
        return asdict(self)


_SOFTMAX_ONLY = dict(norm="none", activation="identity", final_norm=False)
_SCALED_FUSED = dict(_SOFTMAX_ONLY, ffn_kind="fused", ffn_stabilizer="scale")

VARIANTS: dict[str, BlockSpec] = {
    "SM+LN+G": BlockSpec(norm="layernorm", activation="gelu"),
    "SM+LN+R": BlockSpec(norm="layernorm", activation="relu"),
    "SM+LN": BlockSpec(norm="layernorm", activation="identity"),
    # LN-free variants of the paper keep no final norm either (resolution of A9).
    "SM+G": BlockSpec(norm="none", activation="gelu", final_norm=False),
    "SM+R": BlockSpec(norm="none", activation="relu", final_norm=False),
    "SM": BlockSpec(**_SOFTMAX_ONLY),
    "SM+WN": BlockSpec(**_SOFTMAX_ONLY, ffn_stabilizer="weight_norm"),
    "SM+SN": BlockSpec(**_SOFTMAX_ONLY, ffn_stabilizer="spectral_norm"),
    "SM+ScFFN": BlockSpec(**_SOFTMAX_ONLY, ffn_stabilizer="scale"),
    "SM+ScFuFFN": BlockSpec(**_SCALED_FUSED),
    "SM(t)+ScFuFFN": BlockSpec(**_SCALED_FUSED, learnable_temperature=True),
    "EReg(SM(t)+ScFuFFN)": BlockSpec(**_SCALED_FUSED, learnable_temperature=True, entropy_reg=True),
}

BASELINE = "SM+LN+G"
SPEC_FIELDS = tuple(f.name for f in fields(BlockSpec))


def resolve_spec(variant: str, overrides: dict | None = None) -> BlockSpec:
    """The BlockSpec of `variant`, with any explicitly set switch replacing the variant's value."""
    if variant not in VARIANTS:
        raise ValueError(
            f"model.variant={variant!r} is unknown; choose one of: {', '.join(VARIANTS)}"
        )
    spec = VARIANTS[variant]
    set_overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if set_overrides:
        spec = replace(spec, **set_overrides)
    spec.validate()
    return spec
