"""Model FLOPs of a training step, following the variant (for throughput and MFU logging).

The forward counts are the paper's (section 6.8), from analysis/pi_cost.py, for a sequence of T
tokens through all L decoder layers:
    attention  8 T d^2 L + 3 T^2 d L     (Q, K, V, O projections; scores and context)
    FFN        4 T d f L  two-layer (= 16 T d^2 L at f = 4d),   2 T d^2 L fused d x d
plus the LM head, 2 T d V (V = the true vocabulary; the padding rows are not model FLOPs).
Training = 3 x forward (backward = 2 x forward), the usual model-FLOPs convention: activation
recomputation and the entropy regulariser's elementwise work are not counted, so MFU stays
comparable across runs that differ only in those. Embedding lookups, norms, softmax and the
residual scaling are not matmuls and are not counted either.
"""

from __future__ import annotations

from megatron_entropy.analysis.pi_cost import Shape, attention_flops, ffn_flops


def forward_flops(model_cfg, seq_length: int | None = None) -> int:
    """Forward FLOPs of one sequence of `seq_length` (default: model.seq_length) tokens."""
    spec = model_cfg.spec()
    shape = Shape.from_model_config(model_cfg)
    if seq_length is not None:
        shape = Shape(shape.num_layers, shape.num_heads, shape.hidden_size, seq_length, shape.ffn_hidden_size)
    if model_cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be set to count the LM head's FLOPs")
    head = 2 * shape.seq_length * shape.hidden_size * model_cfg.vocab_size
    return attention_flops(shape) + ffn_flops(spec, shape) + head


def training_flops_per_token(model_cfg, seq_length: int | None = None) -> float:
    """Model FLOPs per trained token: 3 x forward FLOPs of a sequence / its length."""
    T = seq_length if seq_length is not None else model_cfg.seq_length
    return 3 * forward_flops(model_cfg, T) / T


def throughput(flops_per_token: float, tokens_per_s: float, devices: int, peak_tflops: float | None) -> dict:
    """{'tflops': achieved model TFLOP/s per device, 'mfu': that / peak} (empty without a peak)."""
    if not peak_tflops:
        return {}
    tflops = flops_per_token * tokens_per_s / max(devices, 1) / 1e12
    return {"tflops": tflops, "mfu": tflops / peak_tflops}
