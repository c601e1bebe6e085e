"""Thumbnails of catalog images: made once per item when first shown, kept in a cache folder, and served instead
of the originals (a result page weighs kilobytes, not megabytes). The whole image is kept (scaled to fit, never
cropped), sharp enough for high-density screens. Items whose images are not files (a Hugging Face data set's
rows) get a larger copy too, for the full view."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from PIL import Image

from .artifacts import atomic_write

THUMBNAIL_SIDE = 320  # twice the size a result is shown at
LARGE_SIDE = 1024


class Thumbnails:
    """``small(item_id)`` and ``large(item_id)`` give image files for an index's items, made on first use."""

    def __init__(self, folder: str | os.PathLike, open_image: Callable[[str], Image.Image],
                 original: Callable[[str], str | None]):
        """``open_image(id)`` reads an item's image; ``original(id)`` is its file, when it is one."""
        self.folder = Path(folder)
        self.open_image, self.original = open_image, original

    def _file(self, item_id: str, side: int) -> Path:
        name = hashlib.sha1(item_id.encode("utf-8")).hexdigest()
        return self.folder / str(side) / name[:2] / f"{name}.jpg"

    def _make(self, item_id: str, side: int) -> str:
        path = self._file(item_id, side)
        if not path.is_file():
            image = self.open_image(item_id).copy()
            image.thumbnail((side, side), Image.LANCZOS)
            atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=88))
        return str(path)

    def small(self, item_id: str) -> str:
        return self._make(item_id, THUMBNAIL_SIDE)

    def large(self, item_id: str) -> str:
        """The original file where there is one, else a large copy."""
        original = self.original(item_id)
        return original if original else self._make(item_id, LARGE_SIDE)
