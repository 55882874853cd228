"""Weighted blends of token-shard datasets (megatron_entropy/data/blend.py)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_entropy.data import DataError
from megatron_entropy.data.blend import BlendedDataset, blend_counts, blend_index


class Fake:
    def __init__(self, tag: int, size: int):
        self.tag, self.size = tag, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        assert 0 <= i < self.size
        return np.array([self.tag, i])


def test_counts_follow_the_weights_and_add_up():
    assert blend_counts([100, 100], [0.7, 0.3]).tolist() == [140, 60]
    assert blend_counts([10, 10, 10], [1, 1, 1]).tolist() == [10, 10, 10]
    counts = blend_counts([7, 5, 3], [0.5, 0.25, 0.25])
    assert counts.sum() == 15 and counts.tolist() == [7, 4, 4]  # 7.5, 3.75, 3.75 -> largest remainders
    assert blend_counts([4, 4], [1, 0]).tolist() == [8, 0]


@pytest.mark.parametrize("weights", [[1.0], [-1, 2], [0, 0], [float("nan"), 1]])
def test_bad_weights_are_data_errors(weights):
    with pytest.raises(DataError):
        blend_counts([5, 5], weights)


def test_up_and_down_sampling_use_whole_seeded_permutations():
    source, sample = blend_index([10, 40], [0.5, 0.5], seed=3)
    assert len(source) == 50
    a = sample[source == 0]  # 25 of a 10-sample source: 2 full passes + 5
    assert np.bincount(a, minlength=10).tolist().count(3) == 5 and np.bincount(a, minlength=10).min() == 2
    b = sample[source == 1]  # 25 of 40: a seeded subset, no repeats
    assert len(set(b.tolist())) == 25 and b.max() < 40


def test_the_index_is_deterministic_and_seed_dependent():
    first = blend_index([30, 20], [0.3, 0.7], seed=1)
    again = blend_index([30, 20], [0.3, 0.7], seed=1)
    other = blend_index([30, 20], [0.3, 0.7], seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_blended_dataset_reads_through_to_its_sources():
    blend = BlendedDataset([Fake(0, 6), Fake(1, 4)], [0.25, 0.75], seed=0, names=["a", "b"])
    assert len(blend) == 10 and blend.counts.tolist() == [3, 7]  # 2.5, 7.5: a tie, the first source wins
    tags = [int(blend[i][0]) for i in range(len(blend))]
    assert tags.count(0) == 3 and tags.count(1) == 7
    assert "a w=0.250: 3 of 6" in blend.describe() and "b w=0.750: 7 of 4 samples (1.75x)" in blend.describe()
    with pytest.raises(IndexError):
        blend[10]
