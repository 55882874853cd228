"""The feed-forward sub-block: two-layer (d -> 4d -> d) or the paper's fused d x d map.

With an identity activation the two matrices multiply into one, so the Softmax-only models use a
single d x d linear layer W_ffn (8x fewer FFN FLOPs). Stabilisers against entropy collapse:
weight or spectral normalisation of the FFN linear layers (LayerNorm-free, foldable at inference),
or the learnable per-layer scaling of Eq. 8:  x <- beta * x + (1 / alpha) * FFN(x).
Under tensor parallelism the two-layer FFN is column- then row-parallel; the fused one is a
row-parallel layer fed by scattering its (replicated) input; alpha and beta are replicated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_entropy.parallel.layers import ColumnParallelLinear, RowParallelLinear

MIN_ABS_ALPHA = 1e-3  # keeps 1/alpha finite (ambiguity A6)

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,
    "identity": lambda x: x,
}


class FeedForward(nn.Module):
    def __init__(self, cfg, spec, state, layer_number: int, seed: int):
        super().__init__()
        d = cfg.hidden_size
        norm = spec.ffn_stabilizer if "ffn" in spec.normalized_linears else "none"
        prefix = f"layers.{layer_number}.ffn"
        common = dict(state=state, bias=False, normalization=norm, init_std=cfg.init_std, seed=seed)
        self.fused = spec.ffn_kind == "fused"
        if self.fused:
            self.fc = RowParallelLinear(d, d, input_is_parallel=False, name=f"{prefix}.fc", **common)
        else:
            self.fc_in = ColumnParallelLinear(d, cfg.ffn_hidden, name=f"{prefix}.fc_in", **common)
            self.fc_out = RowParallelLinear(cfg.ffn_hidden, d, name=f"{prefix}.fc_out", **common)
        self.activation = ACTIVATIONS[spec.activation]
        self.alpha = self.beta = None
        if spec.ffn_stabilizer == "scale":
            self.alpha = nn.Parameter(torch.tensor([float(cfg.alpha_init)]))  # [1]: DeepSpeed cannot broadcast 0-d
            self.beta = nn.Parameter(torch.tensor([float(cfg.beta_init)]))
            for p in (self.alpha, self.beta):
                p.partition_dim, p.no_weight_decay = None, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.fc(x)
        return self.fc_out(self.activation(self.fc_in(x)))

    def safe_alpha(self) -> torch.Tensor:
        return self.alpha.abs().clamp_min(MIN_ABS_ALPHA).copysign(self.alpha)  # keeps alpha's dtype

    def residual(self, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        """The FFN residual update: plain, or the paper's scaled beta * x + ffn / alpha."""
        if self.alpha is None:
            return x + ffn_out
        return self.beta * x + ffn_out / self.safe_alpha()
