"""Images with labels (identities, products, classes), for learning what "alike" means from them.

Either a folder with one sub-folder per label, or a CSV / JSON Lines file of ``image,label`` rows (image paths
relative to the image folder, default the file's folder) with optional binary attribute columns (1 / 0 / -1, as
CelebA's 40). Splits are by label by default: the labels of the test split are never seen in training (the
standard metric-learning protocol); ``split_by="image"`` splits each label's images instead (closed set).
A label with a single image has no positive: it is left out, and counted.
"""
from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import numpy as np

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
SHARES = (0.7, 0.15, 0.15)  # of the labels (or of each label's images)
LABEL_PROTOCOL = EvaluationProtocol("labels", (1, 2, 4, 8), per_category=False, remove_reference=True,
                                    score=("MAP@R",), test_split="test")
ATTRIBUTE_VALUES = {"1": 1, "0": 0, "-1": 0, 1: 1, 0: 0, -1: 0}


def _bucket(key: str, shares=SHARES) -> str:
    """A split for a key, the same every time (a hash, not a random draw)."""
    position = (zlib.crc32(key.encode()) % 10_000) / 10_000
    edges = np.cumsum(shares)
    return SPLITS[int(np.searchsorted(edges, position, side="right"))]


def is_label_file(data: str) -> bool:
    """A CSV of image,label rows (a folder of label folders is told apart by --dataset labels only)."""
    path = Path(data)
    return path.is_file() and path.suffix.lower() == ".csv" and "label" in csv_header(path)


def _single_image_labels(by_label: dict[str, list[str]]) -> set[str]:
    """The labels with one image (no positive to learn from or to find), said in a warning: they are left out."""
    singles = sorted(label for label, ids in by_label.items() if len(ids) < 2)
    if singles:
        shown = ", ".join(singles[:SHOWN]) + (", ..." if len(singles) > SHOWN else "")
        warnings.warn(f"left out {len(singles):,} of {len(by_label):,} labels with a single image (no positive to "
                      f"learn from or to find): {shown}", stacklevel=3)
    return set(singles)


def _share_out(by_label: dict[str, list[str]], split_by: str) -> dict[str, list[str]]:
    """The images of each split: whole labels by a hash of the label (open set), or, closed set, each label's
    images shared out by a hash of the image, at least two of each to train on."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label, ids in by_label.items():
        if split_by == "label":
            splits[_bucket(label)] += ids
        else:
            for n, image_id in enumerate(ids):
                splits["train" if n < 2 else _bucket(image_id)].append(image_id)
    return splits


class LabelledImages(FileSource):
    kind = "labels"
    protocol = LABEL_PROTOCOL

    def __init__(self, data: str | os.PathLike, images: str | os.PathLike | None = None, split_by: str = "label"):
        if split_by not in ("label", "image"):
            raise DataError(f"split_by must be 'label' or 'image', got {split_by!r}")
        self.data, self.split_by = Path(data), split_by
        rows, self.attribute_names = self._read(images)
        by_label: dict[str, list[str]] = {}
        for image_id, label, _ in rows:
            by_label.setdefault(label, []).append(image_id)
        singles = _single_image_labels(by_label)
        self.skipped_labels = len(singles)
        self.label_of = {i: label for i, label, _ in rows if label not in singles}
        self.attributes = {i: a for i, label, a in rows if label not in singles and a is not None}
        self._splits = _share_out({label: ids for label, ids in by_label.items() if label not in singles}, split_by)
        self._check_splits(len(by_label) - len(singles))

    def _check_splits(self, labels: int) -> None:
        """Held-out labels need at least two in val and in test; training needs images."""
        for split in ("val", "test"):
            held = {self.label_of[i] for i in self._splits[split]}
            if self.split_by == "label" and len(held) < 2:
                raise DataError(f"{self.data}: {len(held)} labels fall in the {split} split; held-out labels need "
                                f"at least two (the data set has {labels} labels with two or more images)")
        if not self._splits["train"]:
            raise DataError(f"{self.data}: no training images")

    def _read(self, images) -> tuple[list[tuple[str, str, np.ndarray | None]], list[str]]:
        """(image id, label, attributes) rows, every image checked to be there and attributes to be 1/0/-1."""
        if self.data.is_dir() and images is None:
            self.images = ImageFolder(self.data)
            rows = [(i, name.split("/")[0], None) for i, name in
                    ((n.rsplit(".", 1)[0], n) for n in sorted(set(self.images.files.values()))) if "/" in name]
            if not rows:
                raise DataError(f"{self.data}: no images in label sub-folders (expected FOLDER/<label>/<image>)")
            return rows, []
        if not self.data.is_file():
            raise DataError(f"--data {self.data} does not exist")
        self.images = ImageFolder(Path(images) if images else self.data.parent)
        records = table_rows(self.data)
        fields = list(dict.fromkeys(k for _, record in records for k in record))
        if not records:
            raise DataError(f"{self.data}: no rows of images and labels")
        if "image" not in fields or "label" not in fields:
            raise DataError(f"{self.data}: expected the columns 'image' and 'label' (got {', '.join(fields)})")
        attributes = [f for f in fields if f not in ("image", "label", "split")]
        return [self._row(number, record, attributes) for number, record in records], attributes

    def _row(self, number: int, record: dict, attributes: list[str]) -> tuple[str, str, np.ndarray | None]:
        """One row checked: an image that is there, a label, and each attribute 1, 0 or -1."""
        image, label = record.get("image"), record.get("label")
        if not image or label in (None, ""):
            raise DataError(f"{self.data}: line {number}: 'image' or 'label' is empty")
        if image not in self.images:
            raise DataError(f"{self.data}: line {number}: image {image!r} is not in {self.images.root}")
        values = []
        for name in attributes:
            value = record.get(name)
            if value not in ATTRIBUTE_VALUES:
                raise DataError(f"{self.data}: line {number}: attribute {name!r} is {value!r}; attributes are 1, 0 "
                                f"or -1")
            values.append(ATTRIBUTE_VALUES[value])
        return image, str(label), np.array(values, dtype=np.int8) if attributes else None

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        return {image_id: () for image_id in self._splits[split]}

    def labels(self, split: str) -> dict[str, str]:
        """The label of each image of a split."""
        return {i: self.label_of[i] for i in self.gallery(split)}

    def label_numbers(self, split: str) -> dict[str, int]:
        """Each image of a split with its label's number (0, 1, ... in the labels' sorted order): what losses and
        metrics take as classes."""
        labels = self.labels(split)
        numbers = {label: n for n, label in enumerate(sorted(set(labels.values())))}
        return {i: numbers[label] for i, label in labels.items()}

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data] if self.data.is_file() else []

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.data.resolve()), "images": str(self.images.root.resolve()),
                "split_by": self.split_by}

    def describe(self) -> str:
        return f"the labelled images of {self.data}"


SOURCES.add("labels", SourceKind(is_label_file, lambda options: LabelledImages(options.data, options.images,
                                                                               options.split_by)))
