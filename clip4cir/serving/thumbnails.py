"""Thumbnails of catalog images: made once per item when first shown, kept in a cache folder, and served instead
of the originals (a result page weighs kilobytes, not megabytes). The whole image is kept (scaled to fit, never
cropped), sharp enough for high-density screens. The large copy is what the app shows as a picked reference: the
app hands the browser only files of this folder, never a catalog file (see clip4cir.serving.catalog_routes)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from clip4cir.core.artifacts import atomic_write

THUMBNAIL_SIDE = 320  # twice the size a result is shown at
LARGE_SIDE = 1024


class Thumbnails:
    """``small(item_id)`` and ``large(item_id)`` give JPEG files for an index's items, made on first use."""

    def __init__(self, folder: str | os.PathLike, open_image: Callable[[str], Image.Image]):
        """``open_image(id)`` reads an item's image."""
        self.folder = Path(folder)
        self.open_image = open_image

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
        return self._make(item_id, LARGE_SIDE)
