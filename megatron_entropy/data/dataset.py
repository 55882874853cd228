"""Training samples and their order.

`TokenChunkDataset` serves windows of seq_length + 1 tokens (inputs and their shifted labels).
data.packing says how they are cut: "stream" treats all shards as one token stream cut into fixed
windows (neighbouring windows share one token: the last label of sample i is the first input of
sample i+1), so a window may hold the end of one document and the start of the next, separated by
EOS; "per_document" cuts every document on its own and drops each one's remainder (and documents
shorter than one window), so no sample crosses a document boundary, as the paper's harness did.

`document_starts(i)` gives, for every position of sample i, where its document starts inside the
window; `collate` turns samples into a `Batch` whose `doc_start` drives document attention
(data.document_attention=within: attention masked at document boundaries, positions restarted),
and whose `loss_mask` drops the label that starts a new document when data.eod_mask_loss is set.
Document boundaries come from the shards' .idx (not from EOS tokens, which a foreign shard may not
name), or from EOS where the index holds a whole shard as one document (IndexedTokens).

`GlobalBatchSampler` decides which samples form each global batch: a fresh permutation per epoch
from (seed, epoch), evaluated on the fly (data/order.py, O(1) memory per rank), so the order
depends only on (seed, num_samples) and the number of samples consumed so far. A resumed run
given the same state continues with exactly the same indices,
and `slice_for_rank` splits one global batch over data-parallel ranks and micro-batches
without changing which samples the global batch holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_entropy.data import DataError
from megatron_entropy.data.indexed import IndexedTokens
from megatron_entropy.data.order import SeededPermutation

PACKINGS = ("stream", "per_document")
DOCUMENT_ATTENTIONS = ("cross", "within")


class TokenChunkDataset:
    """Sample i: seq_length + 1 consecutive tokens of the shards, as int64 (see the module doc).

    `expected_vocab_size` is the tokenizer's true vocabulary size (not the model's padded one);
    `expected_tokenizer_identity` is `Tokenizer.identity`. A mismatch with the shards is an error.
    `tokenizer` stands in for the sidecar of foreign shards (IndexedTokens).
    """

    def __init__(self, prefixes, seq_length: int, expected_vocab_size: int | None = None,
                 expected_tokenizer_identity: str | None = None, check_tokens: bool = True,
                 packing: str = "stream", document_attention: str = "cross",
                 eod_mask_loss: bool = False, tokenizer=None):
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if not prefixes:
            raise DataError("no token shards given; pass at least one shard prefix")
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
        if packing not in PACKINGS or document_attention not in DOCUMENT_ATTENTIONS:
            raise DataError(f"packing={packing!r} / document_attention={document_attention!r}: use "
                            f"one of {PACKINGS} / {DOCUMENT_ATTENTIONS}")
        self.seq_length = int(seq_length)
        self.packing, self.document_attention = packing, document_attention
        self.eod_mask_loss = bool(eod_mask_loss)
        self.shards = [IndexedTokens(prefix, check_tokens=check_tokens, tokenizer=tokenizer)
                       for prefix in prefixes]
        self._check_tokenizer(expected_vocab_size, expected_tokenizer_identity)
        self.vocab_size = self.shards[0].vocab_size
        self.tokenizer_identity = self.shards[0].tokenizer_identity

        sizes = [shard.num_tokens for shard in self.shards]
        # shard_starts[k] = position of shard k's first token in the concatenated stream
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.shard_starts[-1])
        self._doc_starts = None  # start of every document in the stream, built when first needed
        if packing == "stream":
            self.sample_starts = None  # sample i starts at i * T
            self.num_samples = max(0, (self.num_tokens - 1) // self.seq_length)
        else:
            self.sample_starts = self._per_document_starts()
            self.num_samples = int(self.sample_starts.size)
        if self.num_samples == 0:
            raise DataError(f"token shards {', '.join(s.prefix for s in self.shards)} hold "
                            f"{self.num_tokens} tokens, fewer than one sample of seq_length + 1 = "
                            f"{self.seq_length + 1}{' in any document' if packing != 'stream' else ''}; "
                            "use more data or a shorter seq_length")
    def _check_tokenizer(self, expected_vocab_size, expected_identity) -> None:
        """Every shard must match the expected tokenizer and, in any case, the first shard.
        A foreign shard (no sidecar) has no identity to compare; its ids were range-checked."""

        def described(vocab, identity):
            parts = [f"vocab {vocab}"] if vocab is not None else []
            parts += [f"(identity {identity[:12]}…)"] if identity is not None else []
            return " ".join(parts)

        first = self.shards[0]
        expected = described(expected_vocab_size, expected_identity)
        for shard in self.shards:
            if (expected_vocab_size is not None and shard.vocab_size != expected_vocab_size) or \
                    _differ(shard.tokenizer_identity, expected_identity):
                other = f"the model/tokenizer uses {expected}"
            elif shard.vocab_size != first.vocab_size or \
                    _differ(shard.tokenizer_identity, first.tokenizer_identity):
                other = f"shard {first.prefix} uses {described(first.vocab_size, first.tokenizer_identity)}"
            else:
                continue
            raise DataError(f"token shards at {shard.prefix} were made with a tokenizer of "
                            f"{described(shard.vocab_size, shard.tokenizer_identity)} but {other}; "
                            "re-run tools/preprocess_data.py with --tokenizer set to the training "
                            "tokenizer")

    def __len__(self) -> int:
        return self.num_samples

    def _per_document_starts(self) -> np.ndarray:
        """Stream positions of the per-document samples: each document of length L gives
        (L - 1) // T windows at its offsets 0, T, 2T, ...; the rest of it is dropped."""
        T = self.seq_length
        starts = self.document_stream_starts()
        ends = np.append(starts[1:], self.num_tokens)
        counts = np.maximum(ends - starts - 1, 0) // T
        first = np.repeat(starts, counts)
        within = np.arange(first.size) - np.repeat(np.cumsum(counts) - counts, counts)
        return (first + within * T).astype(np.int64)

    def document_stream_starts(self) -> np.ndarray:
        """Sorted stream positions where a document starts (every shard starts one)."""
        if self._doc_starts is None:
            parts = [begin + shard.document_offsets()[:-1]
                     for begin, shard in zip(self.shard_starts[:-1], self.shards)]
            self._doc_starts = np.unique(np.concatenate(parts).astype(np.int64))
        return self._doc_starts

    def _start(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return i * self.seq_length if self.sample_starts is None else int(self.sample_starts[i])

    def __getitem__(self, i: int) -> np.ndarray:
        start = self._start(i)
        stop = start + self.seq_length + 1
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pieces = []
        k = first
        while start < stop:  # a window may span the end of one shard and the start of the next
            shard_begin = int(self.shard_starts[k])
            shard_end = int(self.shard_starts[k + 1])
            take_to = min(stop, shard_end)
            if take_to > start:
                pieces.append(self.shards[k].tokens[start - shard_begin:take_to - shard_begin])
            start = take_to
            k += 1
        return np.concatenate(pieces).astype(np.int64)

    def document_starts(self, i: int) -> np.ndarray:
        """int64 [T + 1]: for each window position p, the window position where p's document
        starts (0 for a document begun before the window). Non-decreasing; p itself where a
        document starts at p."""
        start = self._start(i)
        positions = np.arange(start, start + self.seq_length + 1, dtype=np.int64)
        doc_starts = self.document_stream_starts()
        begins = doc_starts[np.searchsorted(doc_starts, positions, side="right") - 1]
        return np.maximum(begins - start, 0)


def _differ(identity, other) -> bool:
    return identity is not None and other is not None and identity != other


@dataclasses.dataclass
class Batch:
    """One micro-batch. tokens/labels/loss_mask [b, T]; doc_start [b, T] (int64) with
    data.document_attention=within: query i attends keys doc_start[b, i] <= j <= i and its
    position is i - doc_start[b, i]; None with cross. loss_mask is None when every label counts."""

    tokens: "torch.Tensor"
    labels: "torch.Tensor"
    loss_mask: "torch.Tensor | None" = None
    doc_start: "torch.Tensor | None" = None

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{name: None if t is None else t.to(device) for name, t in moved.items()})


class GlobalBatchSampler:
    """Deterministic global batches of sample indices across epochs, in O(1) memory per rank.

    Epoch e visits all samples in the order SeededPermutation(n, [seed, e]) (data/order.py): a
    seeded bijection of range(n) evaluated only at the positions a batch needs, so no rank stores
    an order of the corpus. Batches run straight across epoch boundaries, so every global batch is
    full. `order="permutation"` is the earlier materialised np.random permutation, kept so that a
    checkpoint saved with it resumes with the very same order (its state has no "order" key).
    """

    ORDERS = ("feistel", "permutation")

    def __init__(self, num_samples: int, global_batch_size: int, seed: int,
                 consumed_samples: int = 0, order: str = "feistel"):
        if num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if order not in self.ORDERS:
            raise DataError(f"sampler order {order!r} must be one of {', '.join(self.ORDERS)}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.consumed_samples = int(consumed_samples)
        self.order = order
        self._epoch = -1
        self._epoch_order = None  # the epoch's SeededPermutation, or its materialised permutation

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _positions(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions [start, stop) of epoch `epoch`'s order."""
        if epoch != self._epoch:  # batches move through epochs in order: keep one epoch's order
            if self.order == "feistel":
                self._epoch_order = SeededPermutation(self.num_samples, [self.seed, epoch])
            else:
                self._epoch_order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        if self.order == "feistel":
            return self._epoch_order[np.arange(start, stop, dtype=np.int64)]
        return self._epoch_order[start:stop]

    def next_global_batch(self) -> np.ndarray:
        """The next global_batch_size sample indices (int64); advances consumed_samples."""
        batch = []
        needed = self.global_batch_size
        while needed:
            epoch, position = divmod(self.consumed_samples, self.num_samples)
            taken = self._positions(epoch, position, min(self.num_samples, position + needed))
            batch.append(taken)
            self.consumed_samples += taken.size
            needed -= taken.size
        return np.concatenate(batch).astype(np.int64)

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "seed": self.seed, "consumed_samples": self.consumed_samples, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state. The global batch size may change (e.g. batch ramp-up);
        a different seed or number of samples would not be a continuation, so it is an error.
        A state without "order" was saved before the O(1) order: it continues with its own."""
        for key in ("num_samples", "seed"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]} but this run has "
                                f"{key}={getattr(self, key)}; resume with the same data and seed "
                                "or start without the saved data state")
        order = state.get("order", "permutation")
        if order not in self.ORDERS:
            raise DataError(f"sampler state has order={order!r}, which this version does not know; "
                            f"resume with the version that wrote it or start without the saved data state")
        if order != self.order:
            self.order, self._epoch, self._epoch_order = order, -1, None
        self.consumed_samples = int(state["consumed_samples"])


def slice_for_rank(global_indices, dp_rank: int, dp_size: int, micro_batch_size: int) -> list:
    """This data-parallel rank's micro-batches of one global batch.

    Rank r takes the contiguous block global[r*n:(r+1)*n], n = len(global) // dp_size, and cuts
    it into micro-batches in order; the union over ranks and micro-batches is the global batch.
    """
    global_indices = np.asarray(global_indices)
    total = global_indices.shape[0]
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if total % dp_size:
        raise DataError(f"global batch of {total} samples does not divide over {dp_size} "
                        "data-parallel ranks; make global_batch_size a multiple of the DP size")
    per_rank = total // dp_size
    if micro_batch_size < 1 or per_rank % micro_batch_size:
        raise DataError(f"{per_rank} samples per rank do not split into micro-batches of "
                        f"{micro_batch_size}; make global_batch_size = micro_batch_size x DP x "
                        "gradient accumulation steps")
    mine = global_indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[start:start + micro_batch_size] for start in range(0, per_rank, micro_batch_size)]


def collate(dataset, indices) -> Batch:
    """The Batch of these samples: labels are the tokens shifted by one; doc_start and loss_mask
    as the dataset's document_attention and eod_mask_loss ask (defaults: cross, no mask)."""
    import torch  # kept local: preprocessing workers import this package without needing torch

    samples = torch.from_numpy(np.stack([dataset[int(i)] for i in indices]))
    batch = Batch(samples[:, :-1].contiguous(), samples[:, 1:].contiguous())
    within = getattr(dataset, "document_attention", "cross") == "within"
    if within or getattr(dataset, "eod_mask_loss", False):
        starts = torch.from_numpy(np.stack([dataset.document_starts(int(i)) for i in indices]))
        if within:
            batch.doc_start = starts[:, :-1].contiguous()
        if getattr(dataset, "eod_mask_loss", False):
            # Megatron's --eod-mask-loss: no loss on the label that begins the next document
            # (the input there is the previous document's last token, its EOS).
            positions = torch.arange(1, starts.shape[1])
            batch.loss_mask = (starts[:, 1:] != positions).float()
    return batch
