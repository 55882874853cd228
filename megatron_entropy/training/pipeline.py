"""The GPT as a DeepSpeed PipelineModule (parallel.pipeline > 1), built from the model's own classes.

The layer list is the single-module GPTModel unrolled, with no copy of any model code:

    TiedLayerSpec("embedding", PipelineEmbedding)   first stage: tokens + positions
    LayerSpec(PipelineDecoderLayer, layer_number=i) x L  each with the model's shared aux_scale / stats
    LayerSpec(PipelineHead)                         LMHead's final norm (its projection when untied)
    TiedLayerSpec("embedding", forward_fn=...)      last stage: gpt.tied_projection, h @ E_shard^T
    loss_fn = gpt.lm_loss                           vocab-parallel cross entropy, padding masked

DeepSpeed builds the tied Embedding on the first and the last stage, broadcasts its token matrix
from the first stage at start, and all-reduces its gradient between the two after every backward,
so both copies stay identical (only `tokens.weight` is tied; the last stage's copy of the
position table is unused and frozen). Every parameter is drawn from its own named generator
(parallel/random.py), so the pipeline model holds exactly the single-process weights.

The entropy penalty needs nothing from the pipeline: each DecoderLayer attaches its own penalty to
its output (model/entropy.py: AttachAuxLoss), so every stage back-propagates its own layers'
penalties. DeepSpeed scales the gradient the last stage sends upstream by 1/GAS, the same factor
`aux_scale.value` applies to the penalties. Each stage records the entropy statistics of its own
layers into the shared EntropyStats; EntropyStats.reduce sums them over all ranks.

With document attention (data.document_attention=within) the stages pass (hidden, doc_start)
instead of hidden: DeepSpeed sends every tensor of a tuple and gradients only for the floating
ones. With data.eod_mask_loss the labels are (labels, loss_mask).

Partitioning (parallel.pipeline_partition): "parameters" balances trainable parameter counts
(DeepSpeed's method; the tied embedding counts on both ends); "uniform" balances the number of
decoder layers per stage (DeepSpeed's "type:DecoderLayer"; embedding and head ride along on the
first and last stage).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from megatron_entropy.model.block import DecoderLayer
from megatron_entropy.model.entropy import AuxLossScale, EntropyStats
from megatron_entropy.model.gpt import Embedding, LMHead, lm_loss, padded_vocab_size, tied_projection
from megatron_entropy.parallel.state import ParallelState

TIED_KEY = "embedding"
PARTITION_METHODS = {"parameters": "parameters", "uniform": "type:DecoderLayer"}


class PipelineEmbedding(Embedding):
    """Embedding as the first pipeline layer: input_ids -> hidden, or with document attention
    (input_ids, doc_start) -> (hidden, doc_start)."""

    def forward(self, inputs):
        if isinstance(inputs, (tuple, list)):
            input_ids, doc_start = inputs
            return super().forward(input_ids, doc_start), doc_start
        return super().forward(inputs)


class PipelineDecoderLayer(DecoderLayer):
    """DecoderLayer as a pipeline layer: hidden -> hidden, or (hidden, doc_start) -> (hidden, doc_start)."""

    def forward(self, inputs):
        if isinstance(inputs, (tuple, list)):
            hidden, doc_start = inputs
            return super().forward(hidden, doc_start), doc_start
        return super().forward(inputs)


class PipelineHead(LMHead):
    """LMHead as a pipeline layer: forward(hidden) -> this rank's logits shard.

    With tied embeddings the projection is the next pipeline layer (the tied Embedding, see
    `tied_logits`), so forward applies the final norm only.
    """

    def forward(self, hidden) -> torch.Tensor:
        if isinstance(hidden, (tuple, list)):  # (hidden, doc_start): the documents end here
            hidden = hidden[0]
        if self.output is None:
            return self.final_norm(hidden)
        return self.logits(hidden)


def decoder_layers(model: nn.Module) -> list[DecoderLayer]:
    """The DecoderLayers this rank holds (all of them for GPTModel, its stage's for a pipeline)."""
    return [m for m in model.modules() if isinstance(m, DecoderLayer)]


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Per decoder layer: keep only each layer's input, recompute the layer in the backward."""
    for layer in decoder_layers(model):
        layer.checkpoint_activations = enabled


def build_pipeline_model(cfg, state: ParallelState, seed: int, partition: str = "parameters"):
    """The GPT as a PipelineModule over `state.topology`; collective (all ranks, same order)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be set (train.py takes it from the tokenizer)")
    if partition not in PARTITION_METHODS:
        raise ValueError(f"parallel.pipeline_partition={partition!r} must be one of {', '.join(PARTITION_METHODS)}")
    spec = cfg.spec()
    aux_scale, stats = AuxLossScale(), EntropyStats(cfg.num_layers, cfg.num_heads)
    tied = cfg.tie_embeddings

    def head_projection(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
        return tied_projection(hidden, embedding.tokens.weight, state.tp_group)

    if tied:
        layers = [TiedLayerSpec(TIED_KEY, PipelineEmbedding, cfg, state, seed, tied_weight_attr=["tokens.weight"])]
    else:
        layers = [LayerSpec(PipelineEmbedding, cfg, state, seed)]
    layers += [LayerSpec(PipelineDecoderLayer, cfg, spec, state, i, seed, aux_scale, stats) for i in range(cfg.num_layers)]
    layers.append(LayerSpec(PipelineHead, cfg, spec, state, seed, None, tied_elsewhere=tied))
    if tied:
        layers.append(TiedLayerSpec(TIED_KEY, PipelineEmbedding, cfg, state, seed, forward_fn=head_projection,
                                    tied_weight_attr=["tokens.weight"]))

    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, state.tp_size)
    vocab_start = state.tp_rank * (padded // state.tp_size)

    def loss_fn(logits: torch.Tensor, labels) -> torch.Tensor:
        labels, loss_mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        loss = lm_loss(logits, labels, vocab_start, cfg.vocab_size, state.tp_group, loss_mask)
        # Each micro-batch's loss before its backward, as the PP = 1 loop sees it (resilience checks).
        return model.loss_hook(loss) if model.loss_hook is not None else loss

    # DeepSpeed's gloo point-to-point "send" is a broadcast of the stage's output, which autograd
    # then meets in the backward; it passes the gradient through unchanged (the layout tests
    # match the single-process run), so its warning is noise.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    model = PipelineModule(layers=layers, topology=state.topology, loss_fn=loss_fn,
                           partition_method=PARTITION_METHODS[partition])

    # What the training loop, summaries and checkpoints read from a GPTModel.
    model.cfg, model.spec, model.state = cfg, spec, state
    model.aux_scale, model.stats = aux_scale, stats
    model.padded_vocab = padded
    model.is_pipeline = True
    model.loss_hook = None  # set by the training loop: loss -> loss, on the last stage
    if tied and TIED_KEY in model.tied_modules and not state.is_first_stage:
        # The last stage's copy of the embedding only lends its token matrix to the head.
        model.tied_modules[TIED_KEY].positions.requires_grad_(False)
    return model


def mark_parameters_for_grad_norm(model: nn.Module, state: ParallelState) -> None:
    """Flag the parameters this rank must count in the global gradient norm.

    DeepSpeed's norm (fp32 ZeRO-0 clip_grad_norm_ with the pipeline grid as mpu) counts a
    parameter if it is flagged model-parallel or the rank is rank 0 of its whole TP x PP
    replica, then sums over that replica. Unflagged, the later stages' parameters would be left
    out of the norm. Counted once per replica: a TP shard on every rank, a TP-replicated
    parameter on TP rank 0, and the tied embedding on its first stage only (DeepSpeed marks the
    other copy ds_pipe_replicated).
    """
    for p in model.parameters():
        sharded = getattr(p, "partition_dim", None) is not None
        counted = (sharded or state.tp_rank == 0) and not getattr(p, "ds_pipe_replicated", False)
        p.tensor_model_parallel = counted
        p.model_parallel = counted


def check_param_groups_for_zero(model: nn.Module, zero_stage: int, state: ParallelState) -> None:
    """Refuse (ConfigError) a partition that would hang ZeRO-1.

    ZeRO-1 all-reduces the gradient norm over the whole TP x PP replica once per optimizer
    parameter group, and DeepSpeed drops empty groups. A stage that holds only weight-decayed
    parameters (e.g. the embedding alone, which "parameters" partitioning can produce on a small
    model) has one group where the others have two, and the ranks wait for each other forever.
    Collective: every rank calls it and gets the same answer.
    """
    import torch.distributed as dist

    from megatron_entropy.config import ConfigError
    from megatron_entropy.model.gpt import parameter_groups

    if zero_stage < 1 or state.world_size == 1:
        return
    counts = torch.tensor([len(parameter_groups(model, 0.0)), -len(parameter_groups(model, 0.0))])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if int(counts[0]) != -int(counts[1]):
        raise ConfigError(
            f"ZeRO-{zero_stage} with parallel.pipeline={state.pp_size}: some pipeline stages hold only "
            f"weight-decayed parameters (layer boundaries {[int(x) for x in model.parts]}, e.g. an embedding-only stage), "
            "which hangs ZeRO's per-group gradient norm; use --parallel.pipeline_partition uniform "
            "(decoder layers on every stage) or ds_configs/zero0.json")


def bubble_note(stages: int, micro_batches: int) -> str | None:
    """A startup note when the pipeline idles much of each step (None when PP = 1).

    DeepSpeed's TrainSchedule (1F1B) runs any number of micro-batches M >= 1 on S stages — it
    needs no M >= S — but each stage then idles (S - 1) / (M + S - 1) of the step.
    """
    if stages <= 1:
        return None
    idle = (stages - 1) / (micro_batches + stages - 1)
    note = (f"pipeline: {micro_batches} micro-batches per step on {stages} stages (1F1B): each stage "
            f"idles {idle:.0%} of a step")
    if micro_batches < stages:
        note += ("; fewer micro-batches than stages works but wastes most of the pipeline: raise "
                 "train.global_batch_size or lower train.micro_batch_size")
    return note


def batches(dataset, micro_batches, collate, device):
    """The (inputs, labels) micro-batches DeepSpeed's train_batch / eval_batch pull, lazily:
    inputs = tokens or (tokens, doc_start), labels = labels or (labels, loss_mask)."""
    for indices in micro_batches:
        batch = collate(dataset, indices).to(device)
        inputs = batch.tokens if batch.doc_start is None else (batch.tokens, batch.doc_start)
        labels = batch.labels if batch.loss_mask is None else (batch.labels, batch.loss_mask)
        yield inputs, labels


__all__ = ["PipelineEmbedding", "PipelineDecoderLayer", "PipelineHead", "build_pipeline_model", "batches", "bubble_note", "check_param_groups_for_zero", "decoder_layers", "mark_parameters_for_grad_norm",
           "set_activation_checkpointing"]
