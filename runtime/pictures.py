"""A gallery's image folder (``--image-dir``): where the picture of each named image is, for display.

An image's name maps to the file ``<dir>/<name>``, else ``<dir>/<name>.png``, ``.jpg``, ``.jpeg``,
``.webp`` or ``.gif``; only files of those types inside the folder are served (a name such as
``../secret`` finds nothing).
"""

from __future__ import annotations

from pathlib import Path

from runtime.gallery.store import GalleryError

MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
}


class ImageFolder:
    """The pictures of a gallery's images, by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise GalleryError(f"--image-dir {self.path}: no such folder")
        self._root = self.path.resolve()

    def find(self, name: str | None) -> Path | None:
        """The picture of the image named ``name``; None when there is none (or no name)."""
        if not name:
            return None
        for candidate in (name, *(name + suffix for suffix in MEDIA_TYPES)):
            path = (self._root / candidate).resolve()
            if path.suffix.lower() in MEDIA_TYPES and path.is_relative_to(self._root) and path.is_file():
                return path
        return None

    @staticmethod
    def media_type(path: Path) -> str:
        return MEDIA_TYPES[path.suffix.lower()]
