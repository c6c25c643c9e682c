"""Gallery caches: encoded images (text -> image search) and encoded captions (image -> text search).

A cache is a folder with ``gallery.json`` and ``.npy`` arrays, loaded memory-mapped:

* images:   ``images`` (N, R, d), ``image_gram`` (N, R, R) (the per-image term of the exact head),
            ``ids`` (N,) int64, optional ``names.json``;
* captions: ``words`` (W, d) ragged (all captions' words concatenated), ``offsets`` (M+1,),
            ``lengths`` (M,), ``ids`` (M,), ``texts.json``. Captions are stored sorted by length, so
            every run of equal-length captions is a (B, L, d) view of ``words`` with no padding and no copy.

``gallery.json`` binds the cache to the encoder that made it (``image_encoder_id`` /
``text_encoder_id`` from the export manifest) and records each array's shape, dtype and xxh3-64
checksum of its file.

Concurrency. Files carry a generation number and ``gallery.json`` is replaced last, so an interrupted
build or append leaves the previous cache intact and a reader sees one whole generation. Writers (in
this process or others) take an exclusive ``fcntl.flock`` on ``.lock`` from reading the current
generation to the commit; a second writer waits up to ``lock_timeout`` seconds. A reader keeps the
generation it opened while later ones commit: a commit removes an older generation's files only once no
gallery in this process still maps them (readers in other processes keep their memory maps of unlinked
files; a load that races a commit retries on the new generation). Temporary files of a killed writer
are removed by the next writer.

Integrity. Each array's checksum is verified on open when the cache is small enough for it to cost little
(``VERIFY_ON_OPEN_BYTES``), always with ``verify=True`` (``runtime/search.py --verify``).

Layout: ``store.py`` holds the on-disk mechanics (lock, generations, commit, checksums), ``images.py`` and
``captions.py`` the two kinds of cache, ``index.py`` their candidate index (two-stage search), ``folder.py``
the gallery folder (``GalleryFolder``) over its layouts, ``members.py`` and ``shards.py``; this module is
their public face.
"""

from __future__ import annotations

from runtime.gallery.captions import CaptionGallery, build_caption_gallery
from runtime.gallery.folder import Galleries, GalleryFolder
from runtime.gallery.images import ImageGallery, RegionStream, build_image_gallery
from runtime.gallery.store import MANIFEST, VERIFY_ON_OPEN_BYTES, GalleryError, checksum_file, writer_lock

__all__ = [
    "MANIFEST",
    "VERIFY_ON_OPEN_BYTES",
    "CaptionGallery",
    "Galleries",
    "GalleryError",
    "GalleryFolder",
    "ImageGallery",
    "RegionStream",
    "build_caption_gallery",
    "build_image_gallery",
    "checksum_file",
    "writer_lock",
]
