"""GPTModel: embeddings, decoder layers, final norm and the (tied) LM head.

The model is three kinds of pieces — `Embedding`, `DecoderLayer`, `LMHead` — so the same classes
serve the single-module model and the pipeline layer list (training/pipeline.py). Learned absolute
positions and input/output embeddings tied, as in GPT-2. The vocabulary is padded to a multiple of
`make_vocab_size_divisible_by x TP`; padded logits are masked out of the loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_entropy.model.attention import document_positions
from megatron_entropy.model.block import DecoderLayer, make_norm
from megatron_entropy.model.entropy import AuxLossScale, EntropyStats
from megatron_entropy.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_entropy.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_entropy.parallel.mappings import copy_to_tp_region, gather_from_tp_region
from megatron_entropy.parallel.random import normal_init
from megatron_entropy.parallel.state import ParallelState


def padded_vocab_size(vocab_size: int, multiple: int, tp_size: int) -> int:
    step = max(1, multiple) * tp_size
    return ((vocab_size + step - 1) // step) * step


class Embedding(nn.Module):
    def __init__(self, cfg, state: ParallelState, seed: int):
        super().__init__()
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, state.tp_size)
        self.tokens = VocabParallelEmbedding(self.padded_vocab, cfg.hidden_size, state=state,
                                             init_std=cfg.init_std, seed=seed, name="embedding.tokens",
                                             init_rows=cfg.vocab_size)
        self.positions = nn.Parameter(normal_init((cfg.seq_length, cfg.hidden_size), cfg.init_std, seed,
                                                  "embedding.positions"))
        self.positions.partition_dim = None
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def forward(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """doc_start [b, T]: positions restart at every document (Megatron's --reset-position-ids)."""
        T = input_ids.shape[1]
        if doc_start is None:
            return self.dropout(self.tokens(input_ids) + self.positions[:T])
        return self.dropout(self.tokens(input_ids) + self.positions[document_positions(doc_start)])


def tied_projection(hidden: torch.Tensor, weight: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's logits shard: (normed) hidden states times its shard of the tied token embedding."""
    return F.linear(copy_to_tp_region(hidden, tp_group), weight)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, true_vocab: int, tp_group,
            loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean vocab-parallel cross entropy over the tokens of a logits shard (padding masked), or over
    those loss_mask [b, T] keeps (data.eod_mask_loss), as Megatron: sum(loss * mask) / sum(mask)."""
    per_token = vocab_parallel_cross_entropy(logits, labels, vocab_start=vocab_start, true_vocab_size=true_vocab,
                                             group=tp_group)
    if loss_mask is None:
        return per_token.mean()
    loss_mask = loss_mask.to(per_token.dtype)
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


class LMHead(nn.Module):
    """Final norm, logits over this rank's vocabulary shard, and the vocab-parallel loss.

    tied_elsewhere: the output projection is the token embedding of an Embedding held outside this
    module (DeepSpeed's tied module under pipeline parallelism, training/pipeline.py), so no
    output layer is created; the pipeline applies `tied_projection` in its own layer.
    """

    def __init__(self, cfg, spec, state: ParallelState, seed: int, tied_embedding: Embedding | None,
                 tied_elsewhere: bool = False):
        super().__init__()
        self.state, self.true_vocab = state, cfg.vocab_size
        self.final_norm = make_norm(spec.final_norm, cfg.hidden_size)
        self.tied = tied_embedding
        self.output = None
        if tied_embedding is None and not tied_elsewhere:
            padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, state.tp_size)
            self.output = ColumnParallelLinear(cfg.hidden_size, padded, state=state, init_std=cfg.init_std,
                                               seed=seed, name="head.output", init_rows=cfg.vocab_size)
        per_rank = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, state.tp_size) // state.tp_size
        self.vocab_start = state.tp_rank * per_rank

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits [b, T, V_padded / tp]."""
        hidden = self.final_norm(hidden)
        if self.output is not None:
            return self.output(hidden)
        return tied_projection(hidden, self.tied.tokens.weight, self.state.tp_group)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross entropy over the (unmasked) tokens of the micro-batch."""
        return lm_loss(self.logits(hidden), labels, self.vocab_start, self.true_vocab, self.state.tp_group, loss_mask)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gathered logits over the true vocabulary (evaluation and export; not for training)."""
        return gather_from_tp_region(self.logits(hidden), self.state.tp_group)[..., : self.true_vocab]


class GPTModel(nn.Module):
    def __init__(self, cfg, state: ParallelState | None = None, seed: int = 1337):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (train.py takes it from the tokenizer)")
        state = state or ParallelState.single()
        self.cfg, self.spec, self.state = cfg, cfg.spec(), state
        self.aux_scale = AuxLossScale()
        self.stats = EntropyStats(cfg.num_layers, cfg.num_heads)
        self.embedding = Embedding(cfg, state, seed)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.spec, state, i, seed, self.aux_scale, self.stats) for i in range(cfg.num_layers)
        )
        self.head = LMHead(cfg, self.spec, state, seed, self.embedding if cfg.tie_embeddings else None)

    @property
    def padded_vocab(self) -> int:
        return self.embedding.padded_vocab

    def hidden_states(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(input_ids, doc_start)
        for layer in self.layers:
            x = layer(x, doc_start)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_start: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean LM loss if labels are given, else gathered logits [b, T, vocab].
        doc_start [b, T]: document attention and positions (data.document_attention=within);
        loss_mask [b, T]: labels that count (data.eod_mask_loss)."""
        hidden = self.hidden_states(input_ids, doc_start)
        if labels is None:
            return self.head.full_logits(hidden)
        return self.head.loss(hidden, labels, loss_mask)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, temperature, theta, alpha, beta, WN gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = getattr(p, "no_weight_decay", False) or p.dim() < 2 or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # A pipeline stage may hold only one kind (e.g. just the embedding); DeepSpeed's ZeRO drops
    # empty groups, which then no longer line up with the LR scheduler's.
    return [g for g in groups if g["params"]]
