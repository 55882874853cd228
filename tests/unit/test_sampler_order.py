"""The O(1)-memory sample order: a seeded bijection per epoch, deterministic and resumable."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from megatron_entropy.data import DataError, GlobalBatchSampler
from megatron_entropy.data.order import SeededPermutation

RNG = np.random.default_rng(20261202)
SIZES = [1, 2, 3, 5, 16, 17, 255, 256, 257, 1000] + RNG.integers(2, 5000, size=10).tolist()


@pytest.mark.parametrize("n", SIZES)
def test_seeded_permutation_is_a_bijection_of_range_n(n):
    perm = SeededPermutation(n, [3, 0])[np.arange(n)]
    assert perm.dtype == np.int64
    assert np.array_equal(np.sort(perm), np.arange(n))
    # Any positions, in any order or grouping, give the same images (no hidden state).
    some = RNG.integers(0, n, size=min(n, 50))
    assert np.array_equal(SeededPermutation(n, [3, 0])[some], perm[some])


def test_seeded_permutation_depends_on_the_key_and_looks_shuffled():
    n = 4096
    a, b = SeededPermutation(n, [1, 0])[np.arange(n)], SeededPermutation(n, [1, 1])[np.arange(n)]
    c = SeededPermutation(n, [2, 0])[np.arange(n)]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # Shuffled: few fixed points (1 expected) and no memory of position (|rank correlation| small).
    assert (a == np.arange(n)).sum() < 10
    assert abs(np.corrcoef(a, np.arange(n))[0, 1]) < 0.1
    with pytest.raises(IndexError):
        SeededPermutation(n, [1, 0])[[n]]


def batches(sampler, count):
    return [sampler.next_global_batch().tolist() for _ in range(count)]


@pytest.mark.parametrize("n, batch", [(1, 1), (7, 3), (10, 4), (97, 16), (1000, 64), (4099, 512)])
def test_every_epoch_is_a_permutation_without_repeats(n, batch):
    epochs = 3
    sampler = GlobalBatchSampler(n, batch, seed=5)
    flat = np.concatenate([sampler.next_global_batch() for _ in range(-(-epochs * n // batch))])
    for e in range(epochs):
        assert np.array_equal(np.sort(flat[e * n:(e + 1) * n]), np.arange(n))
    if n > 3:
        assert not np.array_equal(flat[:n], flat[n:2 * n])  # a fresh order each epoch


@pytest.mark.parametrize("n, batch, stop", [(13, 5, 3), (1000, 64, 20), (4099, 512, 9)])
def test_resume_at_any_step_continues_exactly(n, batch, stop):
    expected = batches(GlobalBatchSampler(n, batch, seed=11), stop + 7)
    first = GlobalBatchSampler(n, batch, seed=11)
    head = batches(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = GlobalBatchSampler(n, batch, seed=11)
    resumed.load_state_dict(state)
    assert head + batches(resumed, 7) == expected
    assert batches(GlobalBatchSampler(n, batch, seed=11, consumed_samples=stop * batch), 7) == expected[stop:]
    assert expected != batches(GlobalBatchSampler(n, batch, seed=12), stop + 7)  # seed-dependent


def test_a_checkpoint_of_the_materialised_order_resumes_with_it():
    old = GlobalBatchSampler(50, 8, seed=3, order="permutation")
    head = batches(old, 2)
    assert sum(head, []) == np.random.default_rng([3, 0]).permutation(50)[:16].tolist()
    legacy_state = {k: v for k, v in old.state_dict().items() if k != "order"}  # as saved before
    resumed = GlobalBatchSampler(50, 8, seed=3)
    resumed.load_state_dict(legacy_state)
    assert batches(resumed, 10) == batches(old, 10)
    with pytest.raises(DataError, match="order"):
        GlobalBatchSampler(50, 8, seed=3).load_state_dict(dict(legacy_state, order="zigzag"))


def test_memory_does_not_grow_with_the_corpus():
    """1e12 / 2048 samples (1T tokens at T = 2048): the materialised order would be ~3.9 GB."""
    n = 10**12 // 2048
    tracemalloc.start()
    sampler = GlobalBatchSampler(n, 512, seed=1, consumed_samples=n - 100)  # crosses an epoch boundary
    for _ in range(3):
        batch = sampler.next_global_batch()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # bytes: the batch and the round keys
    assert batch.min() >= 0 and batch.max() < n and len(set(batch.tolist())) == 512
