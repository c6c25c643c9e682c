"""runtime/explain.py: the attention equals the reference model's, the score the head's similarity (1e-5),
on every option combination in both directions and on the golden cases from the original code."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import array_model as am
from runtime.explain import EnsembleExplanation, ExplainError, Explanation, combine, explain
from tests.conftest import golden_expected
from tests.helpers import HEAD_OPTIONS, option_config

torch = pytest.importorskip("torch")

from export.model import SCAN, _cosine_similarity, _func_attention, attention, slow_sims  # noqa: E402

TOL = 1e-5


def _aggregate64(relevance: np.ndarray, cfg) -> float:
    """The model's aggregation written out in float64, from the relevances alone."""
    x = relevance.astype(np.float64)
    if cfg.agg_func == "LogSumExp":
        m = (x * cfg.lambda_lse).max()
        return float((m + np.log(np.exp(x * cfg.lambda_lse - m).sum())) / cfg.lambda_lse)
    return float({"Mean": np.mean, "Max": np.max, "Sum": np.sum}[cfg.agg_func](x))


def _reference(query: torch.Tensor, context: torch.Tensor, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The reference model's attention (queryL, sourceL) and each query item's cosine with its context."""
    attn = attention(query[None], context[None], cfg)[0]
    cos = _cosine_similarity(query[None], _func_attention(query[None], context[None], cfg), dim=2)[0]
    return attn.numpy(), cos.numpy()


def _check_pairs(cfg, images: torch.Tensor, captions: torch.Tensor, lengths: np.ndarray, expected=None) -> None:
    """Every (image, caption) pair: attention and relevance against the reference, score against the head."""
    im, cap = images.numpy(), captions.numpy()
    gram = im @ im.transpose(0, 2, 1)
    head = am.sims(np, im, gram, cap, lengths, cfg, np.float32)  # (N, Q)
    if expected is not None:
        np.testing.assert_allclose(head, expected, atol=TOL, rtol=0)
    for q, n_word in enumerate(lengths.tolist()):
        words = captions[q, :n_word]
        for n in range(len(im)):
            ex = explain(cfg, cap[q], n_word, im[n], gram[n])
            where = f"{cfg} image {n} caption {q} ({n_word} words)"
            assert isinstance(ex, Explanation) and ex.cross_attn == cfg.cross_attn
            assert abs(ex.score - head[n, q]) <= TOL, where
            assert abs(ex.score - _aggregate64(ex.relevance, cfg)) <= TOL, where
            if cfg.cross_attn == "t2i":
                ref_attn, ref_cos = _reference(words, images[n], cfg)  # one row per word over the regions
            else:
                ref_attn, ref_cos = _reference(images[n], words, cfg)  # one row per region over the words
            assert ex.attention.shape == ref_attn.shape and ex.attention.dtype == np.float32, where
            assert (ex.n_words, ex.n_regions) == (n_word, im.shape[1])
            np.testing.assert_allclose(ex.attention, ref_attn, atol=TOL, rtol=TOL, err_msg=where)
            np.testing.assert_allclose(ex.attention.sum(axis=1), 1.0, atol=TOL, err_msg=where)
            np.testing.assert_allclose(ex.relevance, ref_cos, atol=TOL, rtol=TOL, err_msg=where)
            no_gram = explain(cfg, cap[q], n_word, im[n])  # the head computes the Gram matrix itself
            assert abs(no_gram.score - ex.score) <= TOL, where


@pytest.mark.parametrize("case", range(len(HEAD_OPTIONS)))
def test_every_option_equals_the_reference_and_the_head(case):
    cfg = option_config(*HEAD_OPTIONS[case], case)
    torch.manual_seed(case)
    model = SCAN(cfg).eval()
    rng = np.random.default_rng(case)
    lengths = np.array([1, 7, 3, 5][: 2 + case % 3], np.int64)
    ids = rng.integers(0, 20, (len(lengths), 7)).astype(np.int64)
    ids[np.arange(7)[None, :] >= lengths[:, None]] = 0
    regions = rng.standard_normal((3, 6, 10)).astype(np.float32)
    regions[:, -1] = 0  # all-zero regions exist in real data
    with torch.no_grad():
        images = model.img_enc(torch.from_numpy(regions))
        captions = model.txt_enc(torch.from_numpy(ids), torch.from_numpy(lengths))
        original = slow_sims(images, captions, torch.from_numpy(lengths), cfg).numpy()
    _check_pairs(cfg, images, captions, lengths, expected=original)


def test_golden_cases(golden):
    """The original code's similarities (tests/golden/) for every pair, from the runtime's own encoders;
    the attention against the reference model on the golden checkpoint's embeddings."""
    from export.checkpoint import load_checkpoint, load_vocab
    from export.weights import encoder_arrays
    from runtime.backends.arrays import ArrayModel
    from runtime.tokenizer import Tokenizer
    from runtime.weights import ScanWeights

    ckpt = load_checkpoint(golden / "ckpt.pth.tar")
    cfg = ckpt.config
    lines = (golden / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    ids, lengths = Tokenizer(load_vocab(golden / "vocab.json", cfg)).encode_batch([s.strip() for s in lines])
    m = ArrayModel(ScanWeights.from_arrays(cfg, encoder_arrays(ckpt.model)))
    images, gram = m.encode_images(np.load(golden / "test_ims.npy"))
    captions = m.encode_ids(ids, lengths)
    expected = golden_expected(golden)  # (images, captions)
    for q, n_word in enumerate(lengths.tolist()):
        for n in range(len(images)):
            ex = explain(cfg, captions[q], n_word, images[n], gram[n])
            assert abs(ex.score - expected[n, q]) <= TOL, f"{golden.name} image {n} caption {q}"
    # attention and relevance: a slice of the pairs against the reference, on the checkpoint's own encoders
    with torch.no_grad():
        t_images = ckpt.model.img_enc(torch.from_numpy(np.load(golden / "test_ims.npy")[:3]))
        t_captions = ckpt.model.txt_enc(torch.from_numpy(ids[:8]), torch.from_numpy(lengths[:8]))
    _check_pairs(cfg, t_images, t_captions, lengths[:8], expected=expected[:3, :8])


def test_float16_storage_uses_the_heads_numerics():
    """A float16 gallery row explained gives the float16 head's score (numpy: float32 GEMMs on float16 data)."""
    cfg = option_config("t2i", "LogSumExp", "clipped_l2norm", 1)
    rng = np.random.default_rng(0)
    im = am.l2norm(np, rng.standard_normal((2, 6, 8))).astype(np.float16)
    cap = am.l2norm(np, rng.standard_normal((1, 5, 8))).astype(np.float16)
    lengths = np.array([5], np.int64)
    head = am.sims(np, im, am.gram(np, im, np.float32).astype(np.float16), cap, lengths, cfg, np.float32)
    for n in range(2):
        ex = explain(cfg, cap[0], 5, im[n], am.gram(np, im[n : n + 1], np.float32)[0].astype(np.float16))
        assert abs(ex.score - head[n, 0]) <= TOL


def test_padding_after_the_length_changes_nothing():
    cfg = option_config("i2t", "Mean", "softmax", 0)
    rng = np.random.default_rng(1)
    words = am.l2norm(np, rng.standard_normal((4, 8))).astype(np.float32)
    regions = am.l2norm(np, rng.standard_normal((5, 8))).astype(np.float32)
    padded = np.concatenate([words, np.zeros((3, 8), np.float32)])
    a, b = explain(cfg, words, 4, regions), explain(cfg, padded, 4, regions)
    assert abs(a.score - b.score) <= TOL and a.attention.shape == b.attention.shape == (5, 4)
    np.testing.assert_allclose(a.attention, b.attention, atol=TOL)


def test_top_lists_each_rows_most_attended_items():
    ex = Explanation(
        score=0.5,
        attention=np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]], np.float32),
        relevance=np.array([0.2, 0.3], np.float32),
        cross_attn="t2i",
    )
    np.testing.assert_array_equal(ex.top(2), [[1, 2], [0, 2]])  # ties to the lower index
    assert ex.top(10).shape == (2, 3)
    assert ex.to_json()["attention"][0] == pytest.approx([0.1, 0.6, 0.3])
    with pytest.raises(ExplainError, match="k must be"):
        ex.top(0)


def test_combine_weights_the_members_scores_as_the_ensemble():
    cfg_a = option_config("t2i", "LogSumExp", "clipped_l2norm", 0)
    cfg_b = option_config("i2t", "Mean", "clipped_l2norm", 1)
    rng = np.random.default_rng(2)
    words = am.l2norm(np, rng.standard_normal((3, 8))).astype(np.float32)
    regions = am.l2norm(np, rng.standard_normal((6, 8))).astype(np.float32)
    a, b = explain(cfg_a, words, 3, regions), explain(cfg_b, words, 3, regions)
    both = combine([a, b], [3, 1])
    assert isinstance(both, EnsembleExplanation) and both.members == (a, b)
    assert both.weights == (0.75, 0.25)
    assert both.score == pytest.approx(0.75 * a.score + 0.25 * b.score, abs=1e-6)
    assert combine([a, b]).score == pytest.approx((a.score + b.score) / 2, abs=1e-6)
    assert [m["cross_attn"] for m in both.to_json()["members"]] == ["t2i", "i2t"]
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ExplainError, match="weights"):
            combine([a, b], bad)
    with pytest.raises(ExplainError, match="at least one"):
        combine([])


@pytest.mark.parametrize(
    "words,length,regions,gram,match",
    [
        (np.zeros((3, 7), np.float32), 2, np.zeros((4, 8), np.float32), None, "words"),
        (np.zeros((3, 8), np.float32), 2, np.zeros((4, 8, 1), np.float32), None, "regions"),
        (np.zeros((3, 8), np.float32), 0, np.zeros((4, 8), np.float32), None, "length"),
        (np.zeros((3, 8), np.float32), 4, np.zeros((4, 8), np.float32), None, "length"),
        (np.zeros((3, 8), np.float32), 2.0, np.zeros((4, 8), np.float32), None, "length"),
        (np.zeros((3, 8), np.int64), 2, np.zeros((4, 8), np.float32), None, "words"),
        (np.zeros((3, 8), np.float32), 2, np.zeros((4, 8), np.float32), np.zeros((3, 3)), "image_gram"),
    ],
)
def test_bad_input_is_refused_by_name(words, length, regions, gram, match):
    cfg = option_config("t2i", "LogSumExp", "clipped_l2norm", 0)  # embed_size 8
    with pytest.raises(ExplainError, match=match):
        explain(cfg, words, length, regions, gram)
