"""The three exportable graphs: image encoder, text encoder (packing-free) and similarity head.

Graph contracts (all batch, length and gallery-block dimensions dynamic; float32 unless noted):

* image:  ``regions (N, R, img_dim)`` -> ``images (N, R, d)``, ``image_gram (N, R, R)``
* text:   ``ids (Q, L) int64``, ``lengths (Q,) int64`` -> ``captions (Q, L, d)`` (zeros past each length)
* head:   ``images (N, R, d)``, [``image_gram (N, R, R)``, t2i only], ``captions (Q, L, d)``,
          ``lengths (Q,) int64`` -> ``sims (N, Q)``

FP16 variants (``precision="fp16"``: float16 features in and out, for TensorRT 11's strongly typed
networks) run the Linear and the GEMMs in float16 and keep float32 islands where float16 is unsafe:
the L2-norm statistics, the whole GRU (its state accumulates over time), softmax statistics and the
log-sum-exp.

The text graph avoids ``pack_padded_sequence`` (it does not export; docs/design.md section 3): every layer runs a
forward GRU over the padded batch and, for a bi-GRU, a backward GRU over each sequence reversed
*within its own length* by a gather and gathered back. Padding only ever follows the valid steps, so
valid outputs equal the packed ones; padded outputs are zeroed at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from export.model import SCAN, batched_sims, gram, l2norm
from runtime.config import SCANConfig


class ImageGraph(nn.Module):
    def __init__(self, model: SCAN, precision: str = "fp32") -> None:
        super().__init__()
        self.img_enc = model.img_enc
        self.half = precision == "fp16"
        if self.half:
            with torch.no_grad():  # weight_norm folded: one plain float16 Linear
                self.weight = nn.Parameter(self.img_enc.fc.weight.detach().half(), requires_grad=False)
                self.bias = nn.Parameter(self.img_enc.fc.bias.detach().half(), requires_grad=False)

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.half:
            images = self.img_enc(regions)  # (N, R, d)
            return images, gram(images)  # (N, R, R)
        x = nn.functional.linear(regions, self.weight, self.bias).float()  # (N, R, d), fp16 GEMM
        if not self.img_enc.no_imgnorm:
            x = l2norm(x, dim=-1)
        images = x.half()
        return images, gram(images)  # (N, R, R) float16


class TextGraph(nn.Module):
    def __init__(self, model: SCAN, precision: str = "fp32") -> None:
        super().__init__()
        enc = model.txt_enc
        rnn = enc.rnn
        self.half = precision == "fp16"
        self.embed = nn.Embedding.from_pretrained(enc.embed.weight.detach().half()) if self.half else enc.embed
        self.bi_gru = enc.bi_gru
        self.no_txtnorm = enc.no_txtnorm
        self.hidden = rnn.hidden_size
        self.forward_grus = nn.ModuleList()
        self.backward_grus = nn.ModuleList()
        for layer in range(rnn.num_layers):
            in_size = rnn.input_size if layer == 0 else rnn.hidden_size * (2 if self.bi_gru else 1)
            self.forward_grus.append(_single_gru(rnn, layer, "", in_size))
            if self.bi_gru:
                self.backward_grus.append(_single_gru(rnn, layer, "_reverse", in_size))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).float()  # (Q, L, w); the GRU runs in float32 at either precision
        steps = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, L)
        last = lengths.unsqueeze(1) - 1  # (Q, 1)
        valid = steps <= last  # (Q, L)
        reverse = torch.where(valid, last - steps, steps)  # (Q, L): t -> len-1-t inside, identity after
        for layer, fwd in enumerate(self.forward_grus):
            out, _ = fwd(x)  # (Q, L, H)
            if self.bi_gru:
                idx_in = reverse.unsqueeze(2).expand(-1, -1, x.shape[2])
                back, _ = self.backward_grus[layer](torch.gather(x, 1, idx_in))
                back = torch.gather(back, 1, reverse.unsqueeze(2).expand(-1, -1, self.hidden))  # (Q, L, H)
                out = torch.cat([out, back], dim=2) if layer + 1 < len(self.forward_grus) else (out + back) / 2
            x = out
        x = x * valid.unsqueeze(2).to(x.dtype)  # (Q, L, d)
        x = x if self.no_txtnorm else l2norm(x, dim=-1)
        return x.half() if self.half else x


def _single_gru(rnn: nn.GRU, layer: int, suffix: str, in_size: int) -> nn.GRU:
    gru = nn.GRU(in_size, rnn.hidden_size, 1, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}{suffix}"))
    return gru


class HeadGraph(nn.Module):
    def __init__(self, cfg: SCANConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, *feeds: torch.Tensor) -> torch.Tensor:
        if self.cfg.cross_attn == "t2i":
            images, image_gram, captions, lengths = feeds
            return batched_sims(images, image_gram, captions, lengths, None, self.cfg)
        images, captions, lengths = feeds
        return batched_sims(images, None, captions, lengths, None, self.cfg)


def head_input_names(cfg: SCANConfig) -> list[str]:
    if cfg.cross_attn == "t2i":
        return ["images", "image_gram", "captions", "lengths"]
    return ["images", "captions", "lengths"]
