"""A decoder layer assembled from a BlockSpec (pre-norm GPT-2 block, norms optional):

    x = x + MHA_t(norm1(x))
    x = x + FFN(norm2(x))        or, with the scaling stabiliser,  beta * x + FFN(x) / alpha
and, with the entropy regulariser, the layer's penalty attached to its output as an auxiliary
loss (model/entropy.py: AttachAuxLoss) so every pipeline stage back-propagates its own penalties.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron_entropy.model.attention import ParallelSelfAttention
from megatron_entropy.model.entropy import AttachAuxLoss
from megatron_entropy.model.ffn import FeedForward
from megatron_entropy.parallel.recompute import checkpoint


def make_norm(enabled: bool, hidden_size: int) -> nn.Module:
    """LayerNorm, or the identity that replaces it in the norm-free variants."""
    if enabled:
        norm = nn.LayerNorm(hidden_size)
        for p in norm.parameters():
            p.partition_dim, p.no_weight_decay = None, True
        return norm
    return nn.Identity()


class DecoderLayer(nn.Module):
    def __init__(self, cfg, spec, state, layer_number: int, seed: int, aux_scale, stats):
        super().__init__()
        self.layer_number = layer_number
        self.norm1 = make_norm(spec.norm == "layernorm", cfg.hidden_size)
        self.attention = ParallelSelfAttention(cfg, spec, state, layer_number, seed)
        self.norm2 = make_norm(spec.norm == "layernorm", cfg.hidden_size)
        self.ffn = FeedForward(cfg, spec, state, layer_number, seed)
        # Shared, mutable objects owned by the model (not submodules: no parameters).
        self._aux_scale, self._stats = aux_scale, stats
        # Activation checkpointing (parallel.activation_checkpointing): keep only this layer's
        # input and recompute the rest in the backward (parallel/recompute.py).
        self.checkpoint_activations = False

    def forward(self, x, doc_start=None):
        """doc_start [b, T] or None: document attention (model/attention.py)."""
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(self, self._forward, x, doc_start)
        return self._forward(x, doc_start)

    def _forward(self, x, doc_start=None):
        attn_out, penalty = self.attention(self.norm1(x), self._stats, doc_start)
        x = x + attn_out
        x = self.ffn.residual(x, self.ffn(self.norm2(x)))
        if penalty is not None:
            x = AttachAuxLoss.apply(x, penalty, self._aux_scale.value)
        return x
