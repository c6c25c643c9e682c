"""SCAN written once over an array module ``xp`` (numpy on the CPU, CuPy on a GPU): encoders and head.

The same functions serve ``--backend numpy`` and ``--backend cupy``: every function takes the array
module first and calls only ``xp.*`` and array methods, so there is no numpy-only branch in the math
(``tests/runtime/test_array_model.py`` checks this on the source). They follow ``export/model.py``
(the reference) and ``export/graphs.py`` (the exported graphs) step for step:

* ``encode_images``: Linear (weight norm folded at export), l2norm unless ``no_imgnorm``, and the
  per-image Gram matrix the t2i head needs.
* ``encode_text``: embedding, uni/bi GRU with 1..n layers, packing-free exactly as the ONNX text
  graph (the backward direction runs over each caption reversed within its own length), directions
  averaged, zeros past each length, l2norm unless ``no_txtnorm``.
* ``sims``: the exact batched head (docs of ``export/model.py``: one GEMM for every (word, region)
  logit, the weighted context's norm through a Gram matrix, unnormalised softmax weights), t2i and
  i2t, all seven raw_feature_norms and four aggregations.

Precision: arrays arrive in their storage dtype (float32, or float16 for a float16 gallery) and the
GEMMs take ``gemm_dtype`` operands: float32, or float16 where the array module has float16 GEMMs with
float32 accumulation (CuPy on cuBLAS). Everything numerically delicate (norms, softmax statistics,
log-sum-exp, the GRU) runs in float32, like the float32 islands of the fp16 graphs.

Elementwise chains go through ``kernels(xp)``: plain functions of arrays, fused into one GPU kernel
each by ``xp.fuse`` where the array module has it (CuPy), called as they are elsewhere (numpy).

Shapes: N images of R regions, Q captions of at most L words, d = embed_size.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

EPS = 1e-8
# Finite mask fill: representable in float16 and far below any masked logit (as export/model.py).
NEG = -1.0e4
# Norms whose output lies in [-1, 1]: exp(lambda * x) needs no max subtraction for lambda <= 30
# (export/model.py explains the bound); the softmax normaliser cancels in the cosine.
BOUNDED_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm")
MAX_BOUNDED_LAMBDA = 30.0
LEAKY_SLOPE = 0.1


# ----------------------------------------------------------------------------- elementwise kernels


@functools.cache
def kernels(xp) -> SimpleNamespace:
    """The head's and the GRU's elementwise chains for ``xp``, fused where ``xp`` can fuse (CuPy)."""

    def leaky_relu(x):
        return xp.maximum(x, x * LEAKY_SLOPE)  # slope < 1: the larger of x and 0.1 x is LeakyReLU

    def cosine(dot, norm, ctx_sq, z):
        # sum(e*s) / max(|query| sqrt(e^T G e), eps * z): the original cosine with the softmax's 1/z cancelled
        return dot / xp.maximum(norm * xp.sqrt(xp.maximum(ctx_sq, 0.0)), z * EPS)

    def gru_cell(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n, h):
        # PyTorch's GRU: r, z gates; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) n + z h
        r = 0.5 * (xp.tanh(0.5 * (gi_r + gh_r)) + 1.0)  # sigmoid without exp overflow
        z = 0.5 * (xp.tanh(0.5 * (gi_z + gh_z)) + 1.0)
        n = xp.tanh(gi_n + r * gh_n)
        return (1.0 - z) * n + z * h

    fns = {"leaky_relu": leaky_relu, "cosine": cosine, "gru_cell": gru_cell}
    fuse = getattr(xp, "fuse", None)
    if fuse is not None:
        fns = {name: fuse(kernel_name=f"scan_{name}")(fn) for name, fn in fns.items()}
    return SimpleNamespace(**fns)


# ----------------------------------------------------------------------------- helpers


def l2norm(xp, x, axis: int = -1):
    return x / (xp.sqrt((x * x).sum(axis=axis, keepdims=True)) + EPS)


def matmul(xp, a, b, gemm_dtype):
    """``a @ b`` on ``gemm_dtype`` operands, result float32 (float16 operands accumulate in float32 on cuBLAS)."""
    return xp.matmul(a.astype(gemm_dtype, copy=False), b.astype(gemm_dtype, copy=False)).astype(xp.float32, copy=False)


def gram(xp, x, gemm_dtype):
    """Per-item Gram matrix (B, T, d) -> (B, T, T), float32."""
    return matmul(xp, x, x.transpose(0, 2, 1), gemm_dtype)


# ----------------------------------------------------------------------------- encoders


def encode_images(xp, regions, weight, bias, no_imgnorm: bool, gemm_dtype, out_dtype):
    """regions (N, R, img_dim) -> images (N, R, d), image_gram (N, R, R), both ``out_dtype``."""
    n, r, k = regions.shape
    x = matmul(xp, regions.reshape(n * r, k), weight.T, gemm_dtype)  # (N*R, d)
    x += bias.astype(xp.float32, copy=False)
    if not no_imgnorm:
        x = l2norm(xp, x)
    images = x.reshape(n, r, -1).astype(out_dtype, copy=False)  # (N, R, d)
    return images, gram(xp, images, gemm_dtype).astype(out_dtype, copy=False)


def _gru(xp, x, w):
    """One single-direction GRU layer over the padded batch x (Q, L, in) -> outputs (Q, L, H), float32."""
    q, steps, _ = x.shape
    h_size = w.weight_hh.shape[1]
    gi = matmul(xp, x.reshape(q * steps, -1), w.weight_ih.T, xp.float32).reshape(q, steps, 3 * h_size)
    gi += w.bias_ih  # (Q, L, 3H): the input half of every gate, for all steps in one GEMM
    w_hh_t = w.weight_hh.T
    cell = kernels(xp).gru_cell
    h = xp.zeros((q, h_size), xp.float32)
    out = xp.empty((q, steps, h_size), xp.float32)
    for t in range(steps):
        gh = xp.matmul(h, w_hh_t)  # (Q, 3H)
        gh += w.bias_hh
        g = gi[:, t]
        h = cell(
            g[:, :h_size],
            g[:, h_size : 2 * h_size],
            g[:, 2 * h_size :],
            gh[:, :h_size],
            gh[:, h_size : 2 * h_size],
            gh[:, 2 * h_size :],
            h,
        )
        out[:, t] = h
    return out


def encode_text(xp, ids, lengths, embed, gru_layers, no_txtnorm: bool, out_dtype):
    """ids (Q, L) int, lengths (Q,) int -> word embeddings (Q, L, d) ``out_dtype``, zero past each length.

    ``gru_layers[layer]`` holds the forward weights and, for a bi-GRU, the backward ones (each with
    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``). ``embed`` may be stored as float16.
    """
    q, steps = ids.shape
    x = embed[ids].astype(xp.float32)  # (Q, L, w); the GRU runs in float32 at either precision
    t = xp.arange(steps).reshape(1, steps)
    last = lengths.reshape(q, 1) - 1
    valid = t <= last  # (Q, L)
    reverse = xp.where(valid, last - t, t)  # (Q, L): t -> len-1-t inside each caption, identity after
    rows = xp.arange(q).reshape(q, 1)
    for layer, directions in enumerate(gru_layers):
        out = _gru(xp, x, directions[0])  # (Q, L, H)
        if len(directions) == 2:
            back = _gru(xp, x[rows, reverse], directions[1])[rows, reverse]  # (Q, L, H), back in reading order
            out = xp.concatenate([out, back], axis=2) if layer + 1 < len(gru_layers) else (out + back) / 2
        x = out
    x = x * valid.reshape(q, steps, 1)  # (Q, L, d)
    if not no_txtnorm:
        x = l2norm(xp, x)
    return x.astype(out_dtype, copy=False)


# ----------------------------------------------------------------------------- head


def masked_softmax(xp, x, axis: int, mask):
    if mask is None:
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
    else:
        x = xp.where(mask, x, x.dtype.type(NEG))
        e = xp.exp(x - x.max(axis=axis, keepdims=True)) * mask
    return e / e.sum(axis=axis, keepdims=True)


def raw_norm(xp, s, axis: int, mask, norm: str):
    """The original's raw_feature_norm along the query axis; only softmax needs the mask (padding is 0)."""
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        s = kernels(xp).leaky_relu(s)
    if norm in ("l2norm", "clipped_l2norm"):
        return l2norm(xp, s, axis)
    if norm in ("l1norm", "clipped_l1norm"):
        return s / (xp.abs(s).sum(axis=axis, keepdims=True) + EPS)
    if norm == "softmax":
        return masked_softmax(xp, s, axis, mask)
    return s


def attention_weights(xp, s, norm_axis: int, norm_mask, soft_axis: int, soft_mask, norm: str, lam: float):
    """Unnormalised softmax weights ``e`` along ``soft_axis`` and their sum ``z`` (softmax = e / z)."""
    if norm in BOUNDED_NORMS and 0 <= lam <= MAX_BOUNDED_LAMBDA:
        if norm == "softmax":
            logits = masked_softmax(xp, s, norm_axis, norm_mask)
            logits *= lam
        else:
            x = kernels(xp).leaky_relu(s) if norm.startswith("clipped") else s
            if norm.endswith("l2norm"):
                stat = xp.sqrt((x * x).sum(axis=norm_axis, keepdims=True))
            else:
                stat = xp.abs(x).sum(axis=norm_axis, keepdims=True)
            logits = x * (lam / (stat + EPS))  # one scale per row instead of a division of the whole tensor
        e = xp.exp(logits, out=logits)
    else:
        logits = raw_norm(xp, s, norm_axis, norm_mask, norm) * lam
        if soft_mask is not None:
            logits = xp.where(soft_mask, logits, logits.dtype.type(NEG))
        logits -= logits.max(axis=soft_axis, keepdims=True)
        e = xp.exp(logits, out=logits)
    if soft_mask is not None:
        e *= soft_mask
    return e, e.sum(axis=soft_axis)


def aggregate(xp, cos, axis: int, mask, lengths, agg_func: str, lambda_lse: float):
    """Aggregate cosines over ``axis`` counting only valid items (mask None: all valid)."""
    if agg_func in ("LogSumExp", "Max"):
        x = cos * lambda_lse if agg_func == "LogSumExp" else cos
        if mask is not None:
            x = xp.where(mask, x, x.dtype.type(NEG))
        m = x.max(axis=axis)
        if agg_func == "Max":
            return m
        # max-subtracted, as the graphs: exp(20 * cos) overflows float16
        return (m + xp.log(xp.exp(x - xp.expand_dims(m, axis)).sum(axis=axis))) / lambda_lse
    if mask is None:
        return cos.sum(axis=axis) if agg_func == "Sum" else cos.mean(axis=axis)
    total = (cos * mask).sum(axis=axis)
    return total if agg_func == "Sum" else total / lengths.astype(xp.float32)


def cross_attention(xp, images, image_gram, captions, lengths, cfg, gemm_dtype):
    """The head before its aggregation: unnormalised attention ``e``, its sums ``z`` and the cosines.

    images (N, R, d), captions (Q, L, d) zero past ``lengths``. ``e`` is (Q, L, N, R) in both modes; the
    attention the model computes is ``e / z`` along the context axis: t2i, regions (axis 3; ``z`` (Q, L, N),
    ``cos`` (Q, L, N), one per word); i2t, words (axis 1; ``z`` and ``cos`` (Q, N, R), one per region).
    ``sims`` aggregates ``cos``; ``runtime/explain.py`` keeps all three for one pair.
    ``image_gram`` (N, R, R) is the t2i head's per-image term (None: computed here; i2t ignores it).
    """
    n, r, d = images.shape
    q, steps, _ = captions.shape
    word_mask = xp.arange(steps).reshape(1, steps) < lengths.reshape(q, 1)  # (Q, L)
    # One GEMM for every (word, region) logit, laid out (Q, L, N, R) as the head graph.
    s = matmul(xp, captions.reshape(q * steps, d), images.reshape(n * r, d).T, gemm_dtype).reshape(q, steps, n, r)
    k = kernels(xp)
    if cfg.cross_attn == "t2i":
        g = gram(xp, images, gemm_dtype) if image_gram is None else image_gram.astype(xp.float32, copy=False)
        e, z = attention_weights(
            xp, s, 1, word_mask.reshape(q, steps, 1, 1), 3, None, cfg.raw_feature_norm, cfg.lambda_softmax
        )  # (Q, L, N, R), (Q, L, N)
        s *= e
        dot = s.sum(axis=3)  # (Q, L, N)
        et = e.reshape(q * steps, n, r).transpose(1, 0, 2)  # (N, Q*L, R)
        ge = xp.matmul(et, g)  # (N, Q*L, R); G is symmetric
        ge *= et
        ctx_sq = ge.sum(axis=2).T.reshape(q, steps, n)  # (Q, L, N)
        c = captions.astype(xp.float32, copy=False)
        word_norm = xp.sqrt((c * c).sum(axis=2)).reshape(q, steps, 1)  # (Q, L, 1)
        return e, z, k.cosine(dot, word_norm, ctx_sq, z)  # cos (Q, L, N)
    caption_gram = gram(xp, captions, gemm_dtype)  # (Q, L, L)
    e, z = attention_weights(
        xp, s, 3, None, 1, word_mask.reshape(q, steps, 1, 1), cfg.raw_feature_norm, cfg.lambda_softmax
    )  # (Q, L, N, R), (Q, N, R)
    ef = e.reshape(q, steps, n * r)
    he = xp.matmul(caption_gram, ef)  # (Q, L, N*R)
    he *= ef
    ctx_sq = he.sum(axis=1).reshape(q, n, r)  # (Q, N, R)
    s *= e
    dot = s.sum(axis=1)  # (Q, N, R)
    im = images.astype(xp.float32, copy=False)
    region_norm = xp.sqrt((im * im).sum(axis=2)).reshape(1, n, r)  # (1, N, R)
    return e, z, k.cosine(dot, region_norm, ctx_sq, z)  # cos (Q, N, R)


def aggregate_pairs(xp, cos, lengths, cfg):
    """Each pair's similarity from ``cross_attention``'s cosines: t2i over its words, i2t over the regions."""
    if cfg.cross_attn == "t2i":
        q, steps, _ = cos.shape
        word_mask = xp.arange(steps).reshape(1, steps, 1) < lengths.reshape(q, 1, 1)  # (Q, L, 1)
        return aggregate(xp, cos, 1, word_mask, lengths.reshape(q, 1), cfg.agg_func, cfg.lambda_lse)  # (Q, N)
    return aggregate(xp, cos, 2, None, None, cfg.agg_func, cfg.lambda_lse)  # (Q, N)


def sims(xp, images, image_gram, captions, lengths, cfg, gemm_dtype):
    """Exact batched SCAN head: images (N, R, d), captions (Q, L, d) zero past ``lengths`` -> (N, Q) float32.

    ``image_gram`` (N, R, R) is the t2i head's per-image term (None: computed here; i2t ignores it).
    """
    _, _, cos = cross_attention(xp, images, image_gram, captions, lengths, cfg, gemm_dtype)
    return aggregate_pairs(xp, cos, lengths, cfg).T  # (N, Q)
