"""Reference SCAN in current PyTorch: encoders and two implementations of the similarity head.

Stacked Cross Attention for Image-Text Matching, Lee, Chen, Hua, Hu, He, ECCV 2018
(arXiv 1803.08024); reference code https://github.com/kuanghuei/SCAN (``model.py``).

* ``ImageEncoder`` / ``TextEncoder`` carry the original parameter names, so the original state dicts
  load strictly; the text encoder runs the GRU over a packed sequence exactly as the original.
* ``slow_sims`` follows the original per-caption loop (``xattn_score_t2i`` / ``xattn_score_i2t``,
  ``func_attention``, ``cosine_similarity``): it is the test oracle.
* ``batched_sims`` is the exact batched head of docs/design.md section 2: one GEMM for every
  (region, word) logit, the weighted-context norm through a Gram matrix, finite masks and a
  max-subtracted log-sum-exp so the same code exports to ONNX/TensorRT and survives fp16.

The two l1 norms call an undefined ``l1norm_d`` in the original and crash; here they divide by the
L1 norm along the query axis (eps 1e-8), the evident intent, which cannot be checked against it.

``batched_sims`` also runs in float16 (the FP16 graphs for TensorRT): the two GEMMs take the input
dtype, and everything numerically delicate (norms, softmax statistics, log-sum-exp) is a float32
island; in float32 the casts are no-ops.

Shapes: N images of R regions, Q captions of at most L words, d = embed_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import SCANConfig

EPS = 1e-8
# Finite mask fill: representable in fp16 (max 65504) and far below any masked logit, so no -inf/NaN.
NEG = -1.0e4


def l2norm(x: torch.Tensor, dim: int, eps: float = EPS) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def l1norm(x: torch.Tensor, dim: int, eps: float = EPS) -> torch.Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


# ----------------------------------------------------------------------------- encoders


class WeightNormLinear(nn.Module):
    """``weight_norm(nn.Linear, dim=None)`` with the original's keys ``weight_g``, ``weight_v``, ``bias``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.empty(()))
        self.bias = nn.Parameter(torch.empty(out_features))
        lin = nn.Linear(in_features, out_features)
        with torch.no_grad():
            self.weight_v.copy_(lin.weight)
            self.weight_g.copy_(lin.weight.norm())
            self.bias.copy_(lin.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ImageEncoder(nn.Module):
    """``EncoderImagePrecomp`` / ``EncoderImageWeightNormPrecomp``: regions -> region embeddings."""

    def __init__(self, cfg: SCANConfig) -> None:
        super().__init__()
        self.no_imgnorm = cfg.no_imgnorm
        if cfg.precomp_enc_type == "weight_norm":
            self.fc: nn.Module = WeightNormLinear(cfg.img_dim, cfg.embed_size)
        else:
            self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.fc(images)  # (N, R, d)
        return features if self.no_imgnorm else l2norm(features, dim=-1)


class TextEncoder(nn.Module):
    """``EncoderText``: token ids -> word embeddings (bi-GRU directions averaged), zeros past each length."""

    def __init__(self, cfg: SCANConfig) -> None:
        super().__init__()
        self.bi_gru = cfg.bi_gru
        self.no_txtnorm = cfg.no_txtnorm
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.rnn = nn.GRU(cfg.word_dim, cfg.embed_size, cfg.num_layers, batch_first=True, bidirectional=cfg.bi_gru)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (Q, L, w)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        words, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (Q, L, k*d)
        if self.bi_gru:
            half = words.shape[2] // 2
            words = (words[:, :, :half] + words[:, :, half:]) / 2  # (Q, L, d)
        return words if self.no_txtnorm else l2norm(words, dim=-1)


# ----------------------------------------------------------------------------- slow oracle


def _cosine_similarity(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    w12 = (x1 * x2).sum(dim)
    w1 = x1.norm(2, dim)
    w2 = x2.norm(2, dim)
    return w12 / (w1 * w2).clamp(min=EPS)


def attention(query: torch.Tensor, context: torch.Tensor, cfg: SCANConfig) -> torch.Tensor:
    """The original ``func_attention``'s attention weights (B, queryL, sourceL): per query item, a softmax
    over the context (``runtime/explain.py`` is tested against these)."""
    batch, source_len = context.shape[0], context.shape[1]
    query_len = query.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, sourceL, queryL)
    norm = cfg.raw_feature_norm
    if norm == "softmax":
        attn = torch.softmax(attn.reshape(batch * source_len, query_len), dim=1).reshape(batch, source_len, query_len)
    elif norm == "l2norm":
        attn = l2norm(attn, 2)
    elif norm == "clipped_l2norm":
        attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    elif norm == "l1norm":
        attn = l1norm(attn, 2)
    elif norm == "clipped_l1norm":
        attn = l1norm(F.leaky_relu(attn, 0.1), 2)
    elif norm == "clipped":
        attn = F.leaky_relu(attn, 0.1)
    attn = attn.transpose(1, 2).reshape(batch * query_len, source_len)
    return torch.softmax(attn * cfg.lambda_softmax, dim=1).reshape(batch, query_len, source_len)


def _func_attention(query: torch.Tensor, context: torch.Tensor, cfg: SCANConfig) -> torch.Tensor:
    """The original ``func_attention``; returns the weighted context (B, queryL, d)."""
    return torch.bmm(attention(query, context, cfg), context)  # (B, queryL, d)


def _aggregate(row_sim: torch.Tensor, cfg: SCANConfig) -> torch.Tensor:
    if cfg.agg_func == "LogSumExp":
        return torch.log(torch.exp(row_sim * cfg.lambda_lse).sum(dim=1)) / cfg.lambda_lse
    if cfg.agg_func == "Max":
        return row_sim.max(dim=1)[0]
    if cfg.agg_func == "Sum":
        return row_sim.sum(dim=1)
    return row_sim.mean(dim=1)


@torch.no_grad()
def slow_sims(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, cfg: SCANConfig) -> torch.Tensor:
    """The original per-caption algorithm. images (N, R, d), captions (Q, L, d) -> sims (N, Q)."""
    n_image = images.shape[0]
    columns = []
    for i in range(captions.shape[0]):
        n_word = int(lengths[i])
        cap_i = captions[i, :n_word, :].unsqueeze(0).repeat(n_image, 1, 1)  # (N, n_word, d)
        if cfg.cross_attn == "t2i":
            context = _func_attention(cap_i, images, cfg)  # (N, n_word, d)
            row_sim = _cosine_similarity(cap_i, context, dim=2)  # (N, n_word)
        else:
            context = _func_attention(images, cap_i, cfg)  # (N, R, d)
            row_sim = _cosine_similarity(images, context, dim=2)  # (N, R)
        columns.append(_aggregate(row_sim, cfg))
    return torch.stack(columns, dim=1)  # (N, Q)


# ----------------------------------------------------------------------------- exact batched head


def _raw_norm(s: torch.Tensor, dim: int, mask: torch.Tensor | None, norm: str) -> torch.Tensor:
    """Normalise logits along the query axis ``dim``; ``mask`` (broadcastable, bool) marks valid items.

    Only ``softmax`` needs the mask: padded words have zero embeddings, so their logits are 0 and add
    nothing to the l1/l2 sums, and LeakyReLU(0) = 0.
    """
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        s = F.leaky_relu(s, 0.1)
    if norm in ("l2norm", "clipped_l2norm"):
        return l2norm(s, dim)
    if norm in ("l1norm", "clipped_l1norm"):
        return l1norm(s, dim)
    if norm == "softmax":
        return masked_softmax(s, dim, mask)
    return s


def masked_softmax(x: torch.Tensor, dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.softmax(x, dim=dim)
    x = x.masked_fill(~mask, NEG)
    e = torch.exp(x - x.amax(dim=dim, keepdim=True)) * mask.to(x.dtype)
    return e / e.sum(dim=dim, keepdim=True)


def masked_aggregate(
    cos: torch.Tensor, dim: int, mask: torch.Tensor | None, lengths: torch.Tensor | None, cfg: SCANConfig
) -> torch.Tensor:
    """Aggregate cosines over ``dim`` counting only valid items (mask None: all valid)."""
    if cfg.agg_func in ("LogSumExp", "Max"):
        x = cos * cfg.lambda_lse if cfg.agg_func == "LogSumExp" else cos
        if mask is not None:
            x = x.masked_fill(~mask, NEG)
        m = x.amax(dim=dim)
        if cfg.agg_func == "Max":
            return m
        # Max-subtracted: exp(20 * cos) overflows fp16 and TensorRT's ReduceLogSumExp does not subtract.
        return (m + torch.log(torch.exp(x - m.unsqueeze(dim)).sum(dim=dim))) / cfg.lambda_lse
    if mask is None:
        return cos.sum(dim=dim) if cfg.agg_func == "Sum" else cos.mean(dim=dim)
    total = (cos * mask.to(cos.dtype)).sum(dim=dim)
    return total if cfg.agg_func == "Sum" else total / lengths.to(cos.dtype)


def gram(x: torch.Tensor) -> torch.Tensor:
    """Per-item Gram matrix: (B, T, d) -> (B, T, T); the gallery caches it."""
    return torch.bmm(x, x.transpose(1, 2))


# Norms whose output lies in [-1, 1]: softmax logits lambda * x then lie in [-lambda, lambda], and for
# lambda <= 30 the float32 head needs no max subtraction at all: e <= e^30, the Gram form e^T G e <= R^2 e^60 |G|
# stays far inside float32 (3.4e38), and e >= e^-30 is far from underflow. The softmax normaliser
# cancels in the cosine, so these unshifted weights give the same result as the original's.
# float16 is another matter: e^11 = 59874 is near its 65504 and G e (up to R e^lambda) overflows sooner,
# so a head fed float16 (the fp16 graphs) always subtracts the max (``_attention_weights``).
BOUNDED_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm")
MAX_BOUNDED_LAMBDA = 30.0


def _attention_weights(
    s: torch.Tensor,
    norm_dim: int,
    norm_mask: torch.Tensor | None,
    soft_dim: int,
    soft_mask: torch.Tensor | None,
    cfg: SCANConfig,
    shift: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised softmax weights ``e`` along ``soft_dim`` and their sum ``z``: softmax = e / z.

    The head never divides the full tensor by ``z``: both the weighted-context dot product and its norm
    scale by 1/z, so the cosine only needs ``z`` in its eps clamp (see ``batched_sims``).

    ``shift`` (the float16 head): always ``e = exp(logits - max)``, so ``e`` lies in [0, 1] with a 1 in
    every row and ``1 <= z <= R``, and the float16 Gram product ``G e`` cannot overflow for any lambda.
    Without it, bounded norms with lambda <= 30 skip the max (one reduction fewer over the largest tensor).
    """
    lam = cfg.lambda_softmax
    norm = cfg.raw_feature_norm
    bounded = norm in BOUNDED_NORMS and 0 <= lam <= MAX_BOUNDED_LAMBDA
    if bounded:
        if norm == "softmax":
            logits = masked_softmax(s, norm_dim, norm_mask) * lam
        else:
            x = F.leaky_relu(s, 0.1) if norm.startswith("clipped") else s
            # vector_norm exports as one ReduceL2 / ReduceL1 pass (not Pow + ReduceSum)
            stat = torch.linalg.vector_norm(x, 2 if norm.endswith("l2norm") else 1, dim=norm_dim, keepdim=True)
            logits = x * (lam / (stat + EPS))  # one scale per row instead of a division of the whole tensor
    else:
        logits = _raw_norm(s, norm_dim, norm_mask, norm) * lam
    if bounded and not shift:
        e = torch.exp(logits)
    else:
        if soft_mask is not None:
            logits = logits.masked_fill(~soft_mask, NEG)
        e = torch.exp(logits - logits.amax(dim=soft_dim, keepdim=True))
    if soft_mask is not None:
        e = e * soft_mask.to(e.dtype)
    return e, e.sum(dim=soft_dim)


def batched_sims(
    images: torch.Tensor,
    image_gram: torch.Tensor | None,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    caption_gram: torch.Tensor | None,
    cfg: SCANConfig,
) -> torch.Tensor:
    """Exact batched SCAN head. images (N, R, d), captions (Q, L, d) zero past ``lengths`` -> sims (N, Q).

    t2i needs ``image_gram`` (N, R, R); i2t needs ``caption_gram`` (Q, L, L); either may be None and is
    then computed here. Never materialises the (N, Q, L, d) weighted context.

    With unnormalised attention weights e (softmax = e / z): the weighted context's dot product with
    its query item is ``sum e*s / z`` and its norm ``sqrt(e^T G e) / z``, so the original
    ``cos = dot / max(|w| |c|, eps)`` equals ``sum(e*s) / max(|w| sqrt(e^T G e), eps * z)`` exactly.
    Each layout keeps the softmax axis off the innermost one the GEMM writes only where unavoidable.
    """
    n, r, d = images.shape
    q, L, _ = captions.shape
    word_mask = torch.arange(L, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # (Q, L)
    # One GEMM for every (word, region) logit, laid out (Q, L, N, R) in both modes: the shape ONNX
    # Runtime's GEMM runs fastest, and the region axis (t2i's softmax) is the contiguous one.
    s = (captions.reshape(q * L, d) @ images.reshape(n * r, d).t()).float().reshape(q, L, n, r)  # (Q, L, N, R)
    if cfg.cross_attn == "t2i":
        if image_gram is None:
            image_gram = gram(images)
        mask = word_mask.reshape(q, L, 1, 1)
        shift = image_gram.dtype.itemsize < 4  # the fp16 graphs: e meets a float16 Gram GEMM, so e <= 1
        e, z = _attention_weights(s, 1, mask, 3, None, cfg, shift)  # (Q, L, N, R), (Q, L, N)
        dot = (e * s).sum(dim=3)  # (Q, L, N)
        et = e.reshape(q * L, n, r).transpose(0, 1)  # (N, Q*L, R)
        ge = torch.matmul(et.to(image_gram.dtype), image_gram).float()  # (N, Q*L, R); G is symmetric
        ctx_sq = (et * ge).sum(dim=2).t().reshape(q, L, n)  # (Q, L, N)
        word_norm = captions.float().norm(dim=2).unsqueeze(2)  # (Q, L, 1)
        cos = dot / torch.maximum(word_norm * ctx_sq.clamp(min=0).sqrt(), z * EPS)  # (Q, L, N)
        return masked_aggregate(cos, 1, word_mask.unsqueeze(2), lengths.unsqueeze(1), cfg).t()  # (N, Q)
    if caption_gram is None:
        caption_gram = gram(captions)
    shift = caption_gram.dtype.itemsize < 4  # as t2i: a float16 Gram GEMM needs e <= 1
    e, z = _attention_weights(s, 3, None, 1, word_mask.reshape(q, L, 1, 1), cfg, shift)  # (Q, L, N, R), (Q, N, R)
    dot = (e * s).sum(dim=1)  # (Q, N, R)
    he = torch.bmm(caption_gram, e.reshape(q, L, n * r).to(caption_gram.dtype)).float()  # (Q, L, N*R)
    ctx_sq = (e.reshape(q, L, n * r) * he).sum(dim=1).reshape(q, n, r)  # (Q, N, R)
    region_norm = images.float().norm(dim=2)  # (N, R)
    cos = dot / torch.maximum(region_norm.unsqueeze(0) * ctx_sq.clamp(min=0).sqrt(), z * EPS)  # (Q, N, R)
    return masked_aggregate(cos, 2, None, None, cfg).t()  # (N, Q)


class SCAN(nn.Module):
    """Both encoders plus the batched head; ``img_enc`` / ``txt_enc`` load the original state dicts."""

    def __init__(self, cfg: SCANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_enc = ImageEncoder(cfg)
        self.txt_enc = TextEncoder(cfg)

    @torch.no_grad()
    def sims(self, regions: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, slow: bool = False) -> torch.Tensor:
        images = self.img_enc(regions)
        captions = self.txt_enc(ids, lengths)
        if slow:
            return slow_sims(images, captions, lengths, self.cfg)
        return batched_sims(images, None, captions, lengths, None, self.cfg)
