"""A catalog for an index: the images of some splits of any data set, each once, with every category and split
that lists it, and their features."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

import numpy as np
from torch.utils.data import Dataset

from clip4cir.core.errors import DataError
from clip4cir.core.fingerprints import digest, file_stats
from clip4cir.data.captions import clean_caption, is_empty_caption
from clip4cir.data.sources import Source
from clip4cir.models.encoder import Encoder
from clip4cir.models.features import extract_image_features
from clip4cir.retrieval.item_table import Item


def catalog_items(source: Source, splits: Sequence[str] | None = None) -> list[Item]:
    """The images of the chosen splits (default: all), each once, with every category and split that lists it;
    an image that cannot be found is left out."""
    categories: dict[str, dict] = {}
    in_splits: dict[str, dict] = {}
    for split in splits or source.splits():
        for image_id, cats in source.gallery(split).items():
            categories.setdefault(image_id, {}).update(dict.fromkeys(cats))
            in_splits.setdefault(image_id, {})[split] = None
    items = [Item(i, source.path(i), tuple(categories[i]), tuple(in_splits[i])) for i in categories
             if source.has_image(i)]
    if not items:
        raise DataError(f"no images found for the splits {', '.join(splits or source.splits())} of "
                        f"{source.describe()}")
    return items


def annotated_captions(source: Source, ids: set[str], per_item: int = 5) -> dict[str, list[list[str]]]:
    """The data set's own captions of the references among ``ids``, each with its target (when the target is
    among them too): one-click suggestions in the app, the known target marked in its results. Each annotation
    stands alone (FashionIQ's two per triplet are not joined: joined, they repeat or contradict each other; the
    evaluation protocol joins them itself), without repeats in any case. Stored in the index, so serving never
    needs the data set's annotation files."""
    out: dict[str, list[list[str]]] = {}
    for split in source.splits():
        try:
            triplets = source.triplets(split)
        except DataError:  # e.g. CIRR's train captions, not downloaded
            continue
        for t in triplets:
            if t.target is None or t.reference not in ids or t.target not in ids:
                continue
            captions = out.setdefault(t.reference, [])
            for caption in t.captions:
                caption = clean_caption(caption)
                if not is_empty_caption(caption) and len(captions) < per_item and \
                        all(c.lower() != caption.lower() for c, _ in captions):
                    captions.append([caption, t.target])
    return {reference: captions for reference, captions in out.items() if captions}


def item_titles(source: Source, ids: set[str]) -> dict[str, str]:
    """The titles of the items among ``ids`` (from the data set's image-text pairs, a title or caption column):
    shown under each item in the app, its alt text, and searched by its picker."""
    return {image_id: title for image_id, title in source.titles().items() if image_id in ids}


def items_fingerprint(items: Sequence[Item]) -> str:
    """What a catalog's items are now: their ids, categories and splits, and their image files' paths, sizes and
    modification times."""
    return digest([(i.id, i.categories, i.splits) for i in items], file_stats(item.path for item in items))


class _ItemImages(Dataset):
    """Items as (position, image tensor); an unreadable image gives None, which extraction leaves out."""

    def __init__(self, items: Sequence[Item], source: Source, transform):
        self.items, self.source, self.transform = items, source, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return str(i), self.transform(self.source.load_image(self.items[i].id))
        except DataError:
            return str(i), None


class _StreamedImages(Dataset):
    """The same for a streamed source: its images read in order, from a position on."""

    def __init__(self, items: Sequence[Item], source: Source, transform, start: int, split: str):
        images = dict(islice(source.iter_images(split, start), len(items)))
        self.images = [images.get(item.id) for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        return str(i), self.transform(image) if image is not None else None


def encode_items(encoder: Encoder, items: Sequence[Item], source: Source, batch_size: int = 64,
                 workers: int = 0, progress: bool = True, start: int = 0) -> tuple[list[Item], np.ndarray, list[Item]]:
    """Raw image features of the items that can be read; returns (items, features, unreadable items). From a
    streamed source, ``items`` are its gallery's from position ``start`` (one split)."""
    if getattr(source, "streaming", False):
        dataset = _StreamedImages(items, source, encoder.transform, start, items[0].splits[0])
        workers = 0
    else:
        dataset = _ItemImages(items, source, encoder.transform)
    positions, features = extract_image_features(encoder, dataset, batch_size, workers, progress,
                                                 desc="catalog features")
    read = {int(p) for p in positions}
    return [items[int(p)] for p in positions], features.numpy(), [item for i, item in enumerate(items) if i not in read]
