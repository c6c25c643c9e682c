"""SCAN model configuration: one frozen dataclass, built once from a checkpoint's ``opt``.

The option names and defaults are those of the original ``train.py`` (kuanghuei/SCAN); unknown option
values are refused by name so that a typo never silently selects another model.
No torch here: the runtime reads the same configuration from the export manifest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")
CROSS_ATTNS = ("t2i", "i2t")
PRECOMP_ENC_TYPES = ("basic", "weight_norm")


class ConfigError(ValueError):
    """An option of the checkpoint's ``opt`` has a value this implementation does not know."""


@dataclass(frozen=True)
class SCANConfig:
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    bi_gru: bool = False
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    precomp_enc_type: str = "basic"
    raw_feature_norm: str = "clipped_l2norm"
    agg_func: str = "LogSumExp"
    cross_attn: str = "t2i"
    lambda_lse: float = 6.0
    lambda_softmax: float = 9.0

    def __post_init__(self) -> None:
        choices = {
            "raw_feature_norm": RAW_FEATURE_NORMS,
            "agg_func": AGG_FUNCS,
            "cross_attn": CROSS_ATTNS,
            "precomp_enc_type": PRECOMP_ENC_TYPES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"unknown {name}={value!r}; expected one of {', '.join(allowed)}")
        for name in ("vocab_size", "img_dim", "embed_size", "word_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lambda_lse", "lambda_softmax"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"{name} must be a number, got {value!r}")

    @classmethod
    def from_opt(cls, opt: Any, vocab_size: int | None = None) -> SCANConfig:
        """Build from the original ``argparse.Namespace`` (or a dict of the same keys).

        Options missing from an older checkpoint take the original ``train.py`` defaults (logged).
        """
        raw = dict(opt) if isinstance(opt, Mapping) else dict(vars(opt))
        kwargs: dict[str, Any] = {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, default in defaults.items():
            if name in raw:
                kwargs[name] = _coerce(name, raw[name], default)
            elif name == "vocab_size":
                if vocab_size is None:
                    raise ConfigError("the checkpoint's opt has no vocab_size and none was given")
                kwargs[name] = vocab_size
            else:
                logger.warning("opt has no %r; using the original default %r", name, default)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SCANConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        return cls(**dict(d))


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Normalise values pickled by Python 2 (bytes strings, longs) and numpy scalars."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(default, bool):
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name} must be a boolean, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
