"""Megatron-style tensor-parallel primitives; they know nothing about the model."""

from megatron_entropy.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_entropy.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_entropy.parallel.state import ParallelState

__all__ = [
    "ColumnParallelLinear", "ParallelState", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
