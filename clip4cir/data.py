"""FashionIQ data layer: annotation files, image lookup and torch Datasets.

Reads the official layout under a root folder::

    captions/cap.{category}.{split}.json       [{"candidate", "target", "captions": [c1, c2]}, ...]
    image_splits/split.{category}.{split}.json [ASIN, ...]
    images/<ASIN>.{jpg,png,jpeg}
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError
from .fingerprints import contents, digest, file_stats

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
CAPTION_STRIP = " \t\r\n.,;:!?"
SHOWN_IDS = 5  # how many missing ids an error message lists
# what crowd workers wrote when they had nothing to say; such a caption carries no information
PLACEHOLDER_CAPTIONS = re.compile(r"(n/?a|none|nan|null|-+)?", re.IGNORECASE)


@dataclass(frozen=True)
class Triplet:
    """One FashionIQ annotation: reference image, target image (None on the test split), two captions."""

    category: str
    reference: str
    target: str | None
    captions: tuple[str, str]


def parse_categories(categories: str | Iterable[str]) -> list[str]:
    """Turn "dress,shirt" or a list into a validated list of FashionIQ categories."""
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    categories = list(categories)
    if not categories:
        raise DataError("no category given; choose from " + ", ".join(CATEGORIES))
    for category in categories:
        if category not in CATEGORIES:
            raise DataError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    return categories


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"missing annotation file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed JSON in {path}: {e}") from e


def clean_caption(caption: str) -> str:
    """Strip the surrounding whitespace and end punctuation of a crowd-written caption."""
    return caption.strip(CAPTION_STRIP)


def is_empty_caption(caption: str) -> bool:
    """Whether a caption says nothing once cleaned: empty, or a placeholder such as "na", "n/a" or "none"."""
    return PLACEHOLDER_CAPTIONS.fullmatch(clean_caption(caption)) is not None


def eval_caption(captions: Sequence[str]) -> str:
    """The caption used for evaluation: "c1 and c2", as CLIP4Cir does."""
    return caption_variant(captions, 0)


def caption_variant(captions: Sequence[str], variant: int) -> str:
    """One of CLIP4Cir's four training captions: 0 "c1 and c2", 1 "c2 and c1", 2 "c1", 3 "c2"."""
    c1, c2 = (clean_caption(c) for c in captions)
    if variant == 0:
        return f"{c1.capitalize()} and {c2}"
    if variant == 1:
        return f"{c2.capitalize()} and {c1}"
    if variant == 2:
        return c1.capitalize()
    if variant == 3:
        return c2.capitalize()
    raise ValueError(f"caption variant must be 0..3, got {variant}")


def random_caption_variant(seed: int, epoch: int, index: int) -> int:
    """The variant a training sample uses: a pure function of (seed, epoch, index), so runs resume exactly."""
    return int(np.random.default_rng([seed, epoch, index]).integers(4))


def load_triplets(root: str | os.PathLike, category: str, split: str) -> list[Triplet]:
    """Read ``captions/cap.{category}.{split}.json``, validating every entry."""
    parse_categories([category])
    _check_split(split)
    path = Path(root) / "captions" / f"cap.{category}.{split}.json"
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of triplets, got {type(entries).__name__}")
    triplets = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is not an object")
        reference, target, captions = entry.get("candidate"), entry.get("target"), entry.get("captions")
        if not isinstance(reference, str) or not reference:
            raise DataError(f"{path}: entry {i} has no 'candidate' id")
        if split != "test" and (not isinstance(target, str) or not target):
            raise DataError(f"{path}: entry {i} has no 'target' id")
        if (not isinstance(captions, list) or len(captions) != 2
                or not all(isinstance(c, str) for c in captions)):
            raise DataError(f"{path}: entry {i} field 'captions' must be a list of two strings")
        triplets.append(Triplet(category, reference, target or None, (captions[0], captions[1])))
    return triplets


def load_image_split(root: str | os.PathLike, category: str, split: str) -> list[str]:
    """Read ``image_splits/split.{category}.{split}.json``: the image ids of that split."""
    parse_categories([category])
    _check_split(split)
    path = Path(root) / "image_splits" / f"split.{category}.{split}.json"
    ids = _read_json(path)
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"{path}: expected a JSON list of image ids")
    return ids


class ImageIndex:
    """Maps image ids to files in ``images/``, resolving whichever of .jpg/.png/.jpeg exists."""

    def __init__(self, images_dir: str | os.PathLike):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise DataError(f"missing image folder {self.images_dir}")
        self._files: dict[str, str] = {}
        with os.scandir(self.images_dir) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    rank = IMAGE_EXTENSIONS.index(ext.lower())
                    old = self._files.get(stem)
                    if old is None or rank < IMAGE_EXTENSIONS.index(os.path.splitext(old)[1].lower()):
                        self._files[stem] = entry.name

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._files

    def path(self, image_id: str) -> Path:
        """The image file of an id; DataError if there is none."""
        name = self._files.get(image_id)
        if name is None:
            raise DataError(f"no image for id {image_id!r} in {self.images_dir}")
        return self.images_dir / name


def count_empty_captions(triplets: Sequence[Triplet]) -> int:
    """How many triplets have a caption that says nothing (see :func:`is_empty_caption`)."""
    return sum(any(map(is_empty_caption, t.captions)) for t in triplets)


def missing_message(what: str, n_missing: int, total: int, ids: Sequence[str], images_dir: Path) -> str:
    """A readable account of missing images: how many of what, where, and the first few missing ids."""
    shown = ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")
    return (f"{n_missing:,} of {total:,} {what} have missing images in {images_dir} "
            f"({len(ids):,} ids, first: {shown}); pass skip_missing=True to drop them")


MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before they are decoded (a JPEG is decoded smaller)
MAX_SIDE = 4096  # larger images are downscaled before preprocessing


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, whatever its mode; a corrupt, truncated, non-image or huge file raises DataError
    naming it, before a huge one is decoded."""
    too_big = (f"image {path} has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels, the limit "
               f"(scale it down first)")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(too_big)
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise DataError(too_big) from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path} is not an image file that can be read (JPEG, PNG, WebP, ...)") from e
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, L, CMYK, I;16 ...) to RGB; transparency becomes white."""
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")


class TripletDataset(Dataset):
    """FashionIQ triplets of one split and several categories.

    Items are dicts with ``index``, ``reference_id``, ``target_id`` ("" on the test split), ``captions`` (the two raw
    captions), ``caption`` (the training caption, randomised four ways when ``randomize_captions``, else
    "c1 and c2"), ``category``, and, when ``transform`` is given, the ``reference`` and ``target`` images.
    ``skip_empty_captions`` drops triplets with an empty caption (training; ``empty_captions`` counts them).
    """

    def __init__(self, root: str | os.PathLike, split: str, categories: str | Iterable[str] = CATEGORIES,
                 transform: Callable | None = None, randomize_captions: bool = False,
                 skip_missing: bool = False, check_images: bool = True, seed: int = 0,
                 skip_empty_captions: bool = False):
        self.root, self.split = Path(root), split
        self.categories = parse_categories(categories)
        self.transform, self.randomize_captions, self.seed, self.epoch = transform, randomize_captions, seed, 0
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist")
        triplets = [t for c in self.categories for t in load_triplets(self.root, c, split)]
        self.images = ImageIndex(self.root / "images") if check_images or transform else None
        self.skipped = 0
        if self.images is not None:
            def has_images(t: Triplet) -> bool:
                return t.reference in self.images and (t.target is None or t.target in self.images)

            missing = [t for t in triplets if not has_images(t)]
            if missing and not skip_missing:
                ids = sorted({i for t in missing for i in (t.reference, t.target) if i and i not in self.images})
                raise DataError(missing_message(f"{split} triplets ({','.join(self.categories)})",
                                                len(missing), len(triplets), ids, self.images.images_dir))
            if missing:
                self.skipped = len(missing)
                warnings.warn(f"skipped {len(missing):,} of {len(triplets):,} {split} triplets with missing images")
                triplets = [t for t in triplets if has_images(t)]
        self.empty_captions = count_empty_captions(triplets)
        if skip_empty_captions and self.empty_captions:
            warnings.warn(f"skipped {self.empty_captions:,} of {len(triplets):,} {split} triplets with an empty "
                          f"caption (such as '' or 'n/a')")
            triplets = [t for t in triplets if not any(map(is_empty_caption, t.captions))]
        if not triplets:
            raise DataError(f"no {split} triplets for {','.join(self.categories)} in {self.root}")
        self.triplets = triplets

    def fingerprint(self) -> str:
        """What the triplets were read from: the caption files' contents and the image files' paths, sizes and
        modification times."""
        files = [self.root / "captions" / f"cap.{c}.{self.split}.json" for c in self.categories]
        images = sorted({i for t in self.triplets for i in (t.reference, t.target) if i})
        paths = [self.images.path(i) for i in images] if self.images is not None else []
        return digest(str(self.root.resolve()), self.split, self.categories, contents(files), file_stats(paths),
                      len(self.triplets))

    def record(self) -> dict:
        """What artifacts made from these triplets record of them."""
        return {"root": str(self.root.resolve()), "split": self.split, "categories": self.categories,
                "triplets": len(self.triplets), "fingerprint": self.fingerprint()}

    def set_epoch(self, epoch: int) -> None:
        """Select the caption randomisation of an epoch (deterministic, also across workers)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.triplets)

    def caption(self, index: int) -> str:
        """The caption sample ``index`` uses in the current epoch."""
        triplet = self.triplets[index]
        if self.randomize_captions:
            return caption_variant(triplet.captions, random_caption_variant(self.seed, self.epoch, index))
        return eval_caption(triplet.captions)

    def __getitem__(self, index: int) -> dict:
        t = self.triplets[index]
        item = {"index": index, "reference_id": t.reference, "target_id": t.target or "", "category": t.category,
                "captions": list(t.captions), "caption": self.caption(index)}
        if self.transform is not None:
            item["reference"] = self.transform(load_image(self.images.path(t.reference)))
            if t.target is not None:
                item["target"] = self.transform(load_image(self.images.path(t.target)))
        return item


class GalleryDataset(Dataset):
    """The images of one split (``image_splits``) for several categories; items are ``(image_id, image)``.

    Ids listed by several categories (shirt and toptee overlap) appear once; ``categories_of`` keeps all.
    """

    def __init__(self, root: str | os.PathLike, split: str, categories: str | Iterable[str] = CATEGORIES,
                 transform: Callable | None = None, skip_missing: bool = False):
        self.root, self.split = Path(root), split
        self.categories = parse_categories(categories)
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist")
        self.transform = transform
        self.categories_of: dict[str, list[str]] = {}
        for category in self.categories:
            for image_id in load_image_split(self.root, category, split):
                self.categories_of.setdefault(image_id, []).append(category)
        ids = list(self.categories_of)
        self.images = ImageIndex(self.root / "images")
        missing = [i for i in ids if i not in self.images]
        self.skipped = 0
        if missing and not skip_missing:
            raise DataError(missing_message(f"{split} split images ({','.join(self.categories)})",
                                            len(missing), len(ids), missing, self.images.images_dir))
        if missing:
            self.skipped = len(missing)
            warnings.warn(f"skipped {len(missing):,} of {len(ids):,} {split} images that are missing")
            ids = [i for i in ids if i in self.images]
        if not ids:
            raise DataError(f"no {split} images for {','.join(self.categories)} in {self.root}")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, index: int) -> Path:
        return self.images.path(self.ids[index])

    def fingerprint(self) -> str:
        """The split files' contents and the image files' paths, sizes and modification times."""
        files = [self.root / "image_splits" / f"split.{c}.{self.split}.json" for c in self.categories]
        return digest(str(self.root.resolve()), self.split, self.categories, contents(files),
                      file_stats(self.path(i) for i in range(len(self.ids))))

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        image = load_image(self.path(index))
        return self.ids[index], self.transform(image) if self.transform is not None else image
