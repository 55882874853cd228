"""Weighted blends of several token-shard datasets (`data.train_data` + `data.train_weights`).

Each prefix k is its own TokenChunkDataset D_k (samples never straddle two sources). The blend
has N = sum_k len(D_k) samples, the size of the plain concatenation, of which source k
contributes n_k = round(w_k / sum(w) x N) (largest remainders, so the n_k add up to N exactly).
Source k's samples are drawn without replacement through seeded permutations of D_k:
whole permutations while n_k exceeds len(D_k) (up-sampling repeats every sample equally often),
then the first n_k mod len(D_k) entries of one more (down-sampling keeps a seeded subset).

The index (source, sample) is a pure function of (seed, the sources' sizes, the weights):
computed in memory, identically on every rank, in a fraction of a second per million samples; no
file is written, so no rank can read a half-built index. The GlobalBatchSampler then shuffles the
blend's N samples per epoch like any dataset, so each epoch holds exactly n_k samples of source k
and a global batch holds w_k of its samples from source k in expectation.
"""

from __future__ import annotations

import numpy as np

from megatron_entropy.data import DataError


def blend_counts(sizes: list[int], weights: list[float], total: int | None = None) -> np.ndarray:
    """n_k: source k's share of `total` (default sum(sizes)) by largest remainders."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(sizes) or len(w) == 0:
        raise DataError(f"{len(weights)} weights for {len(sizes)} datasets; give one weight per data prefix")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DataError(f"blend weights {list(weights)} must be finite, >= 0 and not all 0")
    total = int(sum(sizes) if total is None else total)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")  # ties: the earlier source first
    counts[order[:short]] += 1
    return counts


def blend_index(sizes: list[int], weights: list[float], seed: int,
                total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample) arrays of the blend, each of length total (default sum(sizes))."""
    counts = blend_counts(sizes, weights, total)
    sources, samples = [], []
    for k, (size, n) in enumerate(zip(sizes, counts)):
        if n == 0:
            continue
        if size < 1:
            raise DataError(f"blend source {k} has no samples but weight {weights[k]}; drop it or give it weight 0")
        rounds, rest = divmod(int(n), int(size))
        parts = [np.random.default_rng([seed, k, r]).permutation(size) for r in range(rounds)]
        if rest:
            parts.append(np.random.default_rng([seed, k, rounds]).permutation(size)[:rest])
        samples.append(np.concatenate(parts).astype(np.int64))
        sources.append(np.full(int(n), k, dtype=np.int32))
    return np.concatenate(sources), np.concatenate(samples)


class BlendedDataset:
    """Sample i = datasets[source[i]][sample[i]]; see the module docstring."""

    def __init__(self, datasets: list, weights: list[float], seed: int, names: list[str] | None = None):
        if not datasets:
            raise DataError("a blend needs at least one dataset")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.names = names or [_name(d, k) for k, d in enumerate(self.datasets)]
        first = self.datasets[0]
        self.seq_length = getattr(first, "seq_length", None)
        self.vocab_size = getattr(first, "vocab_size", None)
        self.tokenizer_identity = getattr(first, "tokenizer_identity", None)
        self.document_attention = getattr(first, "document_attention", "cross")
        self.eod_mask_loss = getattr(first, "eod_mask_loss", False)
        self.sizes = [len(d) for d in self.datasets]
        self.source, self.sample = blend_index(self.sizes, self.weights, seed)
        self.counts = np.bincount(self.source, minlength=len(self.datasets))

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return self.datasets[int(self.source[i])][int(self.sample[i])]

    def document_starts(self, i: int) -> np.ndarray:
        return self.datasets[int(self.source[i])].document_starts(int(self.sample[i]))

    def describe(self) -> str:
        total = sum(self.weights)
        parts = [f"{name} w={w / total:.3f}: {int(n):,} of {size:,} samples ({n / max(size, 1):.2f}x)"
                 for name, w, n, size in zip(self.names, self.weights, self.counts, self.sizes)]
        return f"blend of {len(self.datasets)} sources, {len(self):,} samples per epoch: " + "; ".join(parts)


def parse_data_path(items: list[str], weights: list[float] | None = None,
                    key: str = "data.train_data") -> tuple[list[str], list[float]]:
    """(prefixes, weights) from our form (prefixes + separate weights) or Megatron's --data-path
    form, "0.7 data/code 0.3 data/web" (one string or a list of words): weight, prefix pairs.
    A list of prefixes without weights stays a concatenation."""
    words = [word for item in items for word in str(item).split()]
    if not words or _number(words[0]) is None:
        return words, list(weights or [])
    if weights:
        raise DataError(f"{key} holds Megatron-style weights and data.train_weights is set too; "
                        "give the weights in one place")
    pairs = list(zip(words[0::2], words[1::2]))
    if len(words) % 2 or any(_number(w) is None or _number(p) is not None for w, p in pairs):
        raise DataError(f"{key}={' '.join(words)!r} is not 'WEIGHT PREFIX WEIGHT PREFIX ...'; give "
                        "a weight before every prefix, or prefixes only")
    return [p for _, p in pairs], [_number(w) for w, _ in pairs]


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def _name(dataset, k: int) -> str:
    shards = getattr(dataset, "shards", None)
    return shards[0].prefix if shards else f"source {k}"
