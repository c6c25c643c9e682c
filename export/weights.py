"""The encoders' weights as plain arrays (``<name>.weights.npz``), for the graph-free array backend.

Weight norm is folded (``g * v / |v|``) so the file holds the plain Linear the model computes; the
GRU keeps PyTorch's gate layout (rows r, z, n). Names and shapes are checked at load time by
``runtime/weights.py``, which needs neither torch nor onnx. The archive stores only numeric arrays,
so it loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from export.model import SCAN
from runtime.weights import gru_names


def encoder_arrays(model: SCAN) -> dict[str, np.ndarray]:
    """float32 arrays of both encoders, named as ``runtime/weights.py`` expects."""
    cfg = model.cfg
    rnn = model.txt_enc.rnn
    with torch.no_grad():
        arrays = {
            "image.weight": model.img_enc.fc.weight,
            "image.bias": model.img_enc.fc.bias,
            "text.embed": model.txt_enc.embed.weight,
        }
        for layer in range(cfg.num_layers):
            for direction, suffix in (("forward", ""), ("backward", "_reverse"))[: 2 if cfg.bi_gru else 1]:
                for name, key in zip(gru_names(layer, direction), ("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
                    arrays[name] = getattr(rnn, f"{key}_l{layer}{suffix}")
        return {k: np.ascontiguousarray(v.detach().float().cpu().numpy()) for k, v in arrays.items()}


def weights_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
