"""FashionIQ, in its own layout under one root folder::

    captions/cap.{category}.{split}.json       [{"candidate", "target", "captions": [c1, c2]}, ...]
    image_splits/split.{category}.{split}.json [ASIN, ...]
    images/<ASIN>.{jpg,png,jpeg}
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import (
    FASHIONIQ_PROTOCOL,
    SOURCES,
    FileSource,
    ImageFolder,
    SourceKind,
    Triplet,
    read_json_file,
    titles_beside,
    triplet_entries,
)

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def parse_categories(categories: str | Iterable[str], known: Iterable[str] = CATEGORIES) -> list[str]:
    """Turn "dress,shirt" or a list into a validated list of categories."""
    known = list(known)
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    categories = list(categories)
    if not categories:
        raise DataError("no category given; choose from " + ", ".join(known))
    for category in categories:
        if category not in known:
            raise DataError(f"unknown category {category!r}; choose from {', '.join(known)}")
    return categories


def _annotation(root: str | os.PathLike, folder: str, kind: str, category: str, split: str) -> Path:
    """The path of one annotation file, after checking the category and split."""
    parse_categories([category])
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return Path(root) / folder / f"{kind}.{category}.{split}.json"


def load_triplets(root: str | os.PathLike, category: str, split: str) -> list[Triplet]:
    """Read ``captions/cap.{category}.{split}.json``, validating every entry."""
    path = _annotation(root, "captions", "cap", category, split)
    triplets = []
    for i, entry in enumerate(triplet_entries(path)):
        reference, target, captions = entry.get("candidate"), entry.get("target"), entry.get("captions")
        if not isinstance(reference, str) or not reference:
            raise DataError(f"{path}: entry {i} has no 'candidate' id")
        if split != "test" and (not isinstance(target, str) or not target):
            raise DataError(f"{path}: entry {i} has no 'target' id")
        if (not isinstance(captions, list) or len(captions) != 2
                or not all(isinstance(c, str) for c in captions)):
            raise DataError(f"{path}: entry {i} field 'captions' must be a list of two strings")
        triplets.append(Triplet(reference, target or None, (captions[0], captions[1]), category))
    return triplets


def load_image_split(root: str | os.PathLike, category: str, split: str) -> list[str]:
    """Read ``image_splits/split.{category}.{split}.json``: the image ids of that split."""
    path = _annotation(root, "image_splits", "split", category, split)
    ids = read_json_file(path)
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"{path}: expected a JSON list of image ids")
    return ids


def is_fashioniq_root(path: str | os.PathLike) -> bool:
    return (Path(path) / "captions").is_dir() and (Path(path) / "image_splits").is_dir() and \
        any((Path(path) / "captions").glob("cap.*.*.json")) and not (Path(path) / "cirr").is_dir()


class FashionIQ(FileSource):
    """FashionIQ's layout (see the module docstring); ``categories`` narrows it to some of the three."""

    kind = "fashioniq"
    protocol = FASHIONIQ_PROTOCOL

    def __init__(self, root: str | os.PathLike, categories: str | Iterable[str] = CATEGORIES):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist")
        self._categories = parse_categories(categories)
        self._images: ImageFolder | None = None

    @property
    def images(self) -> ImageFolder:
        if self._images is None:
            self._images = ImageFolder(self.root / "images")
        return self._images

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def categories(self) -> list[str]:
        return list(self._categories)

    def triplets(self, split: str) -> list[Triplet]:
        """The triplets of the split, each image id checked to be in its category's split file."""
        self.check_split(split)
        out = []
        for category in self._categories:
            listed = set(load_image_split(self.root, category, split))
            for i, t in enumerate(load_triplets(self.root, category, split)):
                for field, image_id in (("candidate", t.reference), ("target", t.target)):
                    if image_id is not None and image_id not in listed:
                        raise DataError(f"{self.root / 'captions' / f'cap.{category}.{split}.json'}: entry {i}: "
                                        f"{field} {image_id!r} is not in image_splits/split.{category}.{split}.json")
                out.append(t)
        return out

    def titles(self) -> dict[str, str]:
        return titles_beside(self.root)

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        out: dict[str, tuple[str, ...]] = {}
        for category in self._categories:
            for image_id in load_image_split(self.root, category, split):
                out[image_id] = out.get(image_id, ()) + (category,)
        return out

    def annotation_files(self, split: str) -> list[Path]:
        return [self.root / folder / f"{kind}.{c}.{split}.json" for c in self._categories
                for folder, kind in (("captions", "cap"), ("image_splits", "split"))]

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.root.resolve()), "categories": self._categories}

    def describe(self) -> str:
        return f"FashionIQ at {self.root}"


SOURCES.add("fashioniq", SourceKind(is_fashioniq_root, lambda options: FashionIQ(
    options.data, options.categories or ",".join(CATEGORIES))))
