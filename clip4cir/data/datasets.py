"""Torch datasets over any data set (a :class:`~clip4cir.data.sources.Source`): the triplets of a split with their
training captions and images, and the images of a split's gallery. Missing images are found when the dataset
is made, before any work starts."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import Dataset

from clip4cir.core.errors import DataError
from clip4cir.core.fingerprints import digest
from clip4cir.data.captions import CAPTION_ONLY, count_empty_captions, is_empty_caption, random_caption_variant
from clip4cir.data.sources import Source, Triplet
from clip4cir.data.sources.base import check_images_readable, missing_message


def _narrow(categories: str | Iterable[str] | None, source: Source) -> list[str] | None:
    if categories is None:
        return None
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    known = source.categories()
    for category in categories:
        if category not in known:
            raise DataError(f"unknown category {category!r} of {source.describe()}; it has "
                            f"{', '.join(known) or 'none'}")
    return list(categories)


class TripletDataset(Dataset):
    """The triplets of one split (of some categories, when given).

    Items are dicts with ``index``, ``reference_id``, ``target_id`` ("" on a test split), ``caption`` (the
    training caption, drawn from the variants when ``randomize_captions``, else the evaluation caption),
    ``category`` ("" when none), and, when ``transform`` is given, the ``reference`` and ``target`` images.
    ``skip_empty_captions`` drops triplets with an empty caption (training; ``empty_captions`` counts them).
    """

    def __init__(self, source: Source, split: str, categories: str | Iterable[str] | None = None,
                 transform: Callable | None = None, randomize_captions: bool = False, skip_missing: bool = False,
                 check_images: bool = True, seed: int = 0, skip_empty_captions: bool = False):
        self.source, self.split = source, split
        self.categories = _narrow(categories, source)
        self.transform, self.randomize_captions, self.seed, self.epoch = transform, randomize_captions, seed, 0
        triplets = [t for t in source.triplets(split) if self.categories is None or t.category in self.categories]
        self.skipped = 0
        if check_images or transform is not None:
            triplets = self._with_images(triplets, skip_missing)
        self.empty_captions = count_empty_captions(triplets)
        if skip_empty_captions and self.empty_captions:
            warnings.warn(f"skipped {self.empty_captions:,} of {len(triplets):,} {split} triplets with an empty "
                          f"caption (such as '' or 'n/a')", stacklevel=2)
            triplets = [t for t in triplets if not any(map(is_empty_caption, t.captions))]
        if not triplets:
            raise DataError(f"no {split} triplets in {source.describe()}"
                            + (f" for {','.join(self.categories)}" if self.categories else ""))
        self.triplets = triplets

    def _with_images(self, triplets: list[Triplet], skip_missing: bool) -> list[Triplet]:
        """The triplets whose images are there; a missing one is an error naming the images, or, with
        ``skip_missing``, a warning counting the triplets left out (``skipped``)."""
        source = self.source

        def has_images(t: Triplet) -> bool:
            return source.has_image(t.reference) and (t.target is None or source.has_image(t.target))

        missing = [t for t in triplets if not has_images(t)]
        if missing and not skip_missing:
            ids = sorted({i for t in missing for i in (t.reference, t.target) if i and not source.has_image(i)})
            raise DataError(missing_message(f"{self.split} triplets", len(missing), len(triplets), ids,
                                            source.describe()))
        if missing:
            self.skipped = len(missing)
            warnings.warn(f"skipped {len(missing):,} of {len(triplets):,} {self.split} triplets with missing images",
                          stacklevel=3)
        return [t for t in triplets if has_images(t)] if missing else triplets

    def fingerprint_parts(self) -> dict:
        """What the triplets were read from, part by part: the annotation files' contents and the images' files, and
        the frames their captions are read in when title-aware (the template with each reference's title)."""
        images = sorted({i for t in self.triplets for i in (t.reference, t.target) if i})
        frames = [t.frame for t in self.triplets]
        titled = {"frames": digest(frames)} if any(f != CAPTION_ONLY for f in frames) else {}
        return {**self.source.fingerprint_parts(self.split, images), **titled, "categories": self.categories,
                "triplets": len(self.triplets)}

    def fingerprint(self) -> str:
        return digest(self.fingerprint_parts())

    def record(self) -> dict:
        """What artifacts made from these triplets record of them (``parts``: to name what changed)."""
        parts = self.fingerprint_parts()
        return {"source": self.source.record(), "split": self.split, "categories": self.categories,
                "triplets": len(self.triplets), "fingerprint": digest(parts), "parts": parts}

    def set_epoch(self, epoch: int) -> None:
        """Select the caption randomisation of an epoch (deterministic, also across workers)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.triplets)

    def caption(self, index: int) -> str:
        """The caption sample ``index`` uses in the current epoch."""
        variants = self.triplets[index].caption_variants()
        if self.randomize_captions:
            return variants[random_caption_variant(self.seed, self.epoch, index, len(variants))]
        return variants[0]

    def __getitem__(self, index: int) -> dict:
        t = self.triplets[index]
        item = {"index": index, "reference_id": t.reference, "target_id": t.target or "", "category": t.category or "",
                "caption": self.caption(index)}
        if self.transform is not None:
            item["reference"] = self.transform(self.source.load_image(t.reference))
            if t.target is not None:
                item["target"] = self.transform(self.source.load_image(t.target))
        return item


class GalleryDataset(Dataset):
    """The images of one split's gallery (of some categories, when given); items are ``(image_id, image)``.

    An image in several categories appears once; ``categories_of`` keeps them all.
    """

    def __init__(self, source: Source, split: str, categories: str | Iterable[str] | None = None,
                 transform: Callable | None = None, skip_missing: bool = False):
        self.source, self.split, self.transform = source, split, transform
        self.categories = _narrow(categories, source)
        gallery = source.gallery(split)
        self.categories_of = {i: cs for i, cs in gallery.items()
                              if self.categories is None or set(cs) & set(self.categories)}
        ids = list(self.categories_of)
        missing = [i for i in ids if not source.has_image(i)]
        self.skipped = 0
        if missing and not skip_missing:
            raise DataError(missing_message(f"{split} gallery images", len(missing), len(ids), missing,
                                            source.describe()))
        if missing:
            self.skipped = len(missing)
            warnings.warn(f"skipped {len(missing):,} of {len(ids):,} {split} images that are missing", stacklevel=2)
            ids = [i for i in ids if source.has_image(i)]
        if not ids:
            raise DataError(f"no {split} images in {source.describe()}"
                            + (f" for {','.join(self.categories)}" if self.categories else ""))
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, index: int) -> str:
        return self.source.path(self.ids[index])

    def fingerprint(self) -> str:
        return digest(self.source.fingerprint(self.split, self.ids), self.categories)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        image = self.source.load_image(self.ids[index])
        return self.ids[index], self.transform(image) if self.transform is not None else image


class LabelledImageDataset(Dataset):
    """A split's images with their label numbers: items ``{"index", "image", "label"}``."""

    def __init__(self, source, split: str, transform: Callable):
        numbers = source.label_numbers(split)
        self.source, self.transform, self.ids = source, transform, list(numbers)
        self.labels = list(numbers.values())
        self.num_labels = len(set(self.labels))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "image": self.transform(self.source.load_image(self.ids[index])),
                "label": self.labels[index]}


class PairDataset(Dataset):
    """A split's images, each with one of its texts: items ``{"index", "image"}``; :meth:`text` is the text a
    sample uses in the current epoch (drawn among the image's texts, a pure function of seed, epoch and index,
    so a run resumes exactly). One item per image, so a batch never holds one image twice."""

    def __init__(self, source: Source, split: str, transform: Callable | None = None, seed: int = 0):
        texts = source.texts(split)
        if not texts:
            raise DataError(f"no {split} image-text pairs in {source.describe()}")
        self.source, self.split, self.transform, self.seed, self.epoch = source, split, transform, seed, 0
        self.ids, self.texts = list(texts), list(texts.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def text(self, index: int) -> str:
        texts = self.texts[index]
        return texts[random_caption_variant(self.seed, self.epoch, index, len(texts))] if len(texts) > 1 else texts[0]

    def record(self) -> dict:
        """What a model trained on these pairs records of them (``parts``: to name what changed)."""
        parts = {**self.source.fingerprint_parts(self.split, self.ids), "texts": digest(self.texts)}
        return {"source": self.source.record(), "split": self.split, "images": len(self.ids),
                "texts": sum(map(len, self.texts)), "fingerprint": digest(parts), "parts": parts}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        item = {"index": index}
        if self.transform is not None:
            item["image"] = self.transform(self.source.load_image(self.ids[index]))
        return item


def check_triplet_data(source: Source) -> None:
    """Before a run on triplets, without loading a model: every annotation file and image it will read exists
    and every image is a complete image file (the training triplets, the validation triplets and galleries)."""
    val = source.protocol.val_split
    images = []
    for split in ("train", val):
        images += [i for t in TripletDataset(source, split).triplets for i in (t.reference, t.target) if i]
    for category in source.categories() if source.protocol.per_category else [None]:
        images += GalleryDataset(source, val, [category] if category else None).ids
    check_images_readable(source, images)
