import numpy as np
import pytest

from runtime.buckets import encode_by_length, length_batches


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
