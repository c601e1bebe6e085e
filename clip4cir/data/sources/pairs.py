"""Images with their own texts (titles, descriptions): what every shop has before any triplet, for image-text
training (catalog adaptation, clip4cir.training.pairs).

Either a CSV / JSON Lines file of ``image,text`` rows (image paths relative to the image folder, default the
file's folder; several rows may name one image, each a text of it; optional ``category`` and ``split``
columns), or a folder of images each with a sidecar text file of the same name (``a.jpg`` beside ``a.txt``, one
text per non-empty line; ``--dataset pairs``). Without a split column, an image is held out by a hash of its
id (train 80%, val 10%, test 10%): every text of an image is in the split of the image, so no val image is
trained on.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import (
    SHOWN,
    SOURCES,
    EvaluationProtocol,
    FileSource,
    ImageFolder,
    SourceKind,
    csv_header,
    table_rows,
)

SPLITS = ("train", "val", "test")
HELD_OUT = {"val": range(80, 90), "test": range(90, 100)}  # hash buckets of 100
PAIRS_PROTOCOL = EvaluationProtocol("pairs", (1, 5, 10), per_category=False, remove_reference=False,
                                    score=("text→image R@10", "image→text R@10"))
FIELDS = ("image", "text")


def hashed_split(image_id: str) -> str:
    """The split of an image without a split column: a hash of its id, the same every time."""
    bucket = zlib.crc32(image_id.encode()) % 100
    return next((split for split, buckets in HELD_OUT.items() if bucket in buckets), "train")


def _first_json_row(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return {}


def is_pairs_file(data: str) -> bool:
    """A CSV whose header, or a JSON Lines file whose first row, names 'image' and 'text'."""
    path = Path(data)
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    names = csv_header(path) if suffix == ".csv" else list(_first_json_row(path)) if suffix == ".jsonl" else []
    return all(f in names for f in FIELDS)


class ImageTextPairs(FileSource):
    kind = "pairs"
    protocol = PAIRS_PROTOCOL

    def __init__(self, data: str | os.PathLike, images: str | os.PathLike | None = None):
        self.data = Path(data)
        self._texts: dict[str, dict[str, tuple[str, ...]]] = {s: {} for s in SPLITS}
        self._categories: dict[str, tuple[str, ...]] = {}
        if self.data.is_dir():
            self._read_folder()
        else:
            self._read_file(images)
        for split in ("train", "val"):
            if not self._texts[split]:
                raise DataError(f"{self.data}: no image falls in the {split} split (image-text training needs both "
                                f"train and val images; the data set has {self.size():,} images)")

    def size(self) -> int:
        return sum(len(texts) for texts in self._texts.values())

    def _add(self, image_id: str, text: str, split: str, category: str | None) -> None:
        texts = self._texts[split].get(image_id, ())
        self._texts[split][image_id] = texts + ((text,) if text not in texts else ())
        if category and category not in self._categories.get(image_id, ()):
            self._categories[image_id] = self._categories.get(image_id, ()) + (category,)

    def _read_folder(self) -> None:
        self.images = ImageFolder(self.data)
        names = sorted(set(self.images.files.values()))
        lacking = []
        for name in names:
            image_id = name.rsplit(".", 1)[0]
            sidecar = self.data / f"{image_id}.txt"
            texts = [t.strip() for t in sidecar.read_text(encoding="utf-8").splitlines() if t.strip()] \
                if sidecar.is_file() else []
            if not texts:
                lacking.append(image_id)
            for text in texts:
                self._add(image_id, text, hashed_split(image_id), None)
        if lacking:
            shown = ", ".join(lacking[:SHOWN]) + (", ..." if len(lacking) > SHOWN else "")
            raise DataError(f"{self.data}: {len(lacking):,} of {len(names):,} images have no text (a sidecar .txt "
                            f"file of the same name with a line of text): {shown}")

    def _read_file(self, images) -> None:
        if not self.data.is_file():
            raise DataError(f"--data {self.data} does not exist")
        self.images = ImageFolder(Path(images) if images else self.data.parent)
        rows = table_rows(self.data)
        if not rows:
            raise DataError(f"{self.data} holds no image-text pairs")
        for number, row in rows:
            where = f"{self.data}: line {number}"
            image, text = row.get("image"), row.get("text")
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: field 'image' is missing")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field 'text' is missing or empty")
            if image not in self.images:
                raise DataError(f"{where}: image {image!r} is not in {self.images.root}")
            split = row.get("split") or hashed_split(self.images.files[image].rsplit(".", 1)[0])
            if split not in SPLITS:
                raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            image_id = self.images.files[image].rsplit(".", 1)[0]
            for other in SPLITS:
                if other != split and image_id in self._texts[other]:
                    raise DataError(f"{where}: image {image!r} is in the {split} split here and in the {other} "
                                    f"split on an earlier line")
            self._add(image_id, text.strip(), split, row.get("category") or None)

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self._texts[s])

    def categories(self) -> list[str]:
        return sorted({c for cs in self._categories.values() for c in cs})

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        return {image_id: self._categories.get(image_id, ()) for image_id in self._texts[split]}

    def texts(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        return dict(self._texts[split])

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data] if self.data.is_file() else []  # sidecar texts: PairDataset hashes the texts

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.data.resolve()), "images": str(self.images.root.resolve())}

    def describe(self) -> str:
        return f"the image-text pairs of {self.data}"


SOURCES.add("pairs", SourceKind(is_pairs_file, lambda options: ImageTextPairs(options.data, options.images)))
