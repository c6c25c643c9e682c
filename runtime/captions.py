"""Captions files: one caption per line, UTF-8, as in the original precomp layout (``{split}_caps.txt``)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data file or folder that does not follow the original precomp layout."""


def read_captions(path: str | Path) -> list[str]:
    """The captions of ``path``, one per line, stripped; trailing blank lines are dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
