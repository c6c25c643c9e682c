import itertools

import numpy as np
import pytest

from runtime.buckets import encode_by_length, length_batches, length_groups


def test_length_batches_cover_every_index_once_in_ascending_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=103)
    batches = list(length_batches(lengths, 10))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(103))
    assert np.all(np.diff(lengths[flat]) >= 0)
    # stable: equal lengths keep their input order
    for value in np.unique(lengths):
        same = flat[lengths[flat] == value]
        assert np.all(np.diff(same) > 0)


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_length_batches_rejects_bad_batch(batch):
    with pytest.raises(ValueError, match="batch"):
        list(length_batches(np.array([1, 2]), batch))


def test_encode_by_length_pads_each_batch_to_its_own_max():
    class Engine:
        def encode_ids(self, ids, lengths):
            return ids[..., None].astype(np.float32) * np.ones(2, np.float32)

    lengths = np.array([3, 1, 2, 5])
    ids = np.arange(4 * 5).reshape(4, 5)
    seen = {}
    for idx, words in encode_by_length(Engine(), ids, lengths, 2):
        assert words.shape == (len(idx), lengths[idx].max(), 2)
        for row, j in enumerate(idx):
            seen[int(j)] = words[row, : lengths[j], 0]
    for j in range(4):
        np.testing.assert_array_equal(seen[j], ids[j, : lengths[j]])


def test_length_groups_bound_the_padding_and_cover_every_index_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, 200)
    groups = list(length_groups(lengths, 16, pad_words=4))
    order = np.concatenate(groups)
    assert sorted(order.tolist()) == list(range(200))  # each once
    assert (np.diff(lengths[order]) >= 0).all()  # ascending, as length_batches
    for g in groups:
        assert 1 <= len(g) <= 16
        # the padding each caption added to its batch-mates stayed within pad_words
        for j in range(1, len(g)):
            assert j * (lengths[g[j]] - lengths[g[j - 1]]) <= 4
    # consecutive groups: the next caption would have padded the group by more than pad_words, or it was full
    for a, b in itertools.pairwise(groups):
        assert len(a) == 16 or len(a) * (lengths[b[0]] - lengths[a[-1]]) > 4
    assert [len(g) for g in length_groups(np.full(40, 7), 16)] == [16, 16, 8]  # equal lengths: full batches
    assert [g.tolist() for g in length_groups(np.array([5, 30]), 16)] == [[0], [1]]
    assert list(length_groups(np.array([], np.int64), 4)) == []


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_length_groups_rejects_bad_batch(batch):
    with pytest.raises(ValueError, match="batch"):
        list(length_groups(np.array([1, 2]), batch))
