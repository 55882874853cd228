"""A seeded permutation of range(n) evaluated position by position, in O(1) memory.

The sample order of an epoch used to be `np.random.default_rng([seed, epoch]).permutation(n)`,
materialised on every rank: 8 bytes per sample, ~4 GB per rank at 1T tokens of T = 2048, times
the ranks of a node. `SeededPermutation(n, key)[positions]` gives the same kind of object -- a
bijection of range(n) fixed by its key -- without storing it: a balanced Feistel network on
2^(2h) >= n values (a bijection by construction, whatever its round function), restricted to
range(n) by cycle walking (an output >= n is encrypted again until it lands inside; the first
value inside is the image, and following the cycle keeps the map one-to-one). The domain is
< 4n, so a position needs fewer than 4 walks on average. Everything is vectorised numpy uint64.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # 4 already make a Feistel network a pseudo-random permutation (Luby-Rackoff); 2 spare
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's bijective 64-bit finaliser (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class SeededPermutation:
    """perm[i] for i in range(n): a bijection of range(n) chosen by `key` (a list of ints)."""

    def __init__(self, n: int, key):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = int(n)
        self.half_bits = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        keys = np.random.default_rng(key).integers(0, 2**63, size=ROUNDS, dtype=np.int64)
        self.round_keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.round_keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << shift) | right

    def __getitem__(self, positions) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        out = self._encrypt(pos.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle walking
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
