"""A plain catalog: every image file under a folder; its first-level sub-folder is its category. Ids are the
paths relative to the folder, without extension. One split, ``all``; no triplets (index and search it; train
and evaluate need triplets)."""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import SOURCES, EvaluationProtocol, FileSource, ImageFolder, SourceKind

CATALOG_PROTOCOL = EvaluationProtocol("catalog", (1, 5, 10, 50), per_category=False, remove_reference=True,
                                                val_split="all")


class ImageCatalog(FileSource):
    kind = "folder"
    protocol = CATALOG_PROTOCOL

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"image folder {self.folder} does not exist")
        self.images = ImageFolder(self.folder)
        self._ids = {name.rsplit(".", 1)[0]: name for name in sorted(set(self.images.files.values()))}
        if not self._ids:
            raise DataError(f"no images (.jpg, .png, .webp, ...) under {self.folder}")

    def splits(self) -> tuple[str, ...]:
        return ("all",)

    def categories(self) -> list[str]:
        return sorted({c for cs in self.gallery("all").values() for c in cs})

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        return {image_id: ((name.split("/")[0],) if "/" in name else ()) for image_id, name in self._ids.items()}

    def annotation_files(self, split: str) -> list[Path]:
        return []

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.folder.resolve())}

    def describe(self) -> str:
        return f"the images under {self.folder}"


# any folder no other kind recognises is a catalog of its images
SOURCES.add("folder", SourceKind(lambda data: Path(data).is_dir(), lambda options: ImageCatalog(options.data),
                                 fallback=True))
