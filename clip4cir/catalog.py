"""Catalog sources for an index: a FashionIQ-layout root, or any folder of images (sub-folder = category)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torch.utils.data import Dataset

from .data import CATEGORIES, GalleryDataset, load_image, parse_categories
from .encoder import CLIPEncoder
from .errors import DataError
from .features import extract_image_features
from .fingerprints import digest, file_stats
from .item_table import Item

FOLDER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def fashioniq_items(root: str | os.PathLike, categories: str | Iterable[str] = CATEGORIES,
                    splits: Sequence[str] = ("val",)) -> list[Item]:
    """The images of the chosen splits and categories, each once, with every category and split that lists it."""
    paths: dict[str, str] = {}
    memberships: dict[str, tuple[dict, dict]] = {}
    for split in splits:
        for category in parse_categories(categories):
            gallery = GalleryDataset(root, split, [category], skip_missing=True)
            for i, image_id in enumerate(gallery.ids):
                paths.setdefault(image_id, str(gallery.path(i).resolve()))
                cats, spls = memberships.setdefault(image_id, ({}, {}))
                cats[category] = spls[split] = None
    return [Item(i, paths[i], tuple(cats), tuple(spls)) for i, (cats, spls) in memberships.items()]


def folder_items(folder: str | os.PathLike) -> list[Item]:
    """Every image file under ``folder``; its first-level sub-folder is the category (None at the top level).
    Ids are the paths relative to the folder, without extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS):
        relative = path.relative_to(folder)
        categories = (relative.parts[0],) if len(relative.parts) > 1 else ()
        items.append(Item(relative.with_suffix("").as_posix(), str(path.resolve()), categories))
    if not items:
        raise DataError(f"no images ({', '.join(sorted(FOLDER_EXTENSIONS))}) under {folder}")
    return items


def items_fingerprint(items: Sequence[Item]) -> str:
    """What a catalog's items are now: their ids, categories and splits, and their image files' paths, sizes and
    modification times."""
    return digest([(i.id, i.categories, i.splits) for i in items], file_stats(item.path for item in items))


class _ItemImages(Dataset):
    """Items as (position, image tensor); an unreadable image gives None, which extraction leaves out."""

    def __init__(self, items: Sequence[Item], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return str(i), self.transform(load_image(self.items[i].path))
        except DataError:
            return str(i), None


def encode_items(encoder: CLIPEncoder, items: Sequence[Item], batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> tuple[list[Item], np.ndarray, list[Item]]:
    """Raw image features of the items that can be read; returns (items, features, unreadable items)."""
    positions, features = extract_image_features(encoder, _ItemImages(items, encoder.transform), batch_size,
                                                 workers, progress, desc="catalog features")
    read = {int(p) for p in positions}
    return [items[int(p)] for p in positions], features.numpy(), [item for i, item in enumerate(items) if i not in read]
