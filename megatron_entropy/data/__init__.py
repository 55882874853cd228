"""Data pipeline: tokenizers, the embedded default corpus, memory-mapped token shards and
the deterministic sample order used by training.

Every error caused by bad input (a missing file, a corrupt shard, a tokenizer that does not
match the shards) is a `DataError` whose message is one line naming the problem and the fix.
"""


class DataError(ValueError):
    """Bad data input; the message is one line saying what is wrong and how to fix it."""


# Imported after DataError: the submodules import it from here.
from megatron_entropy.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece  # noqa: E402
from megatron_entropy.data.indexed import IndexedTokens, write_indexed  # noqa: E402
from megatron_entropy.data.dataset import (  # noqa: E402
    Batch,
    GlobalBatchSampler,
    TokenChunkDataset,
    collate,
    slice_for_rank,
)
from megatron_entropy.data.corpus import DefaultData, embedded_documents, prepare_default_data  # noqa: E402

__all__ = [
    "DataError",
    "Tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
    "IndexedTokens",
    "write_indexed",
    "TokenChunkDataset",
    "Batch",
    "GlobalBatchSampler",
    "slice_for_rank",
    "collate",
    "DefaultData",
    "embedded_documents",
    "prepare_default_data",
]
