"""Data sets behind one interface (:class:`~clip4cir.sources.base.Source`): FashionIQ, CIRR, a user's own
triplets (JSONL or CSV over an image folder), labelled images (a folder per label, or image,label rows), a
plain image folder, and Hugging Face ``datasets``. ``--data`` names one; its kind is recognised from what is
there, or given with ``--dataset`` (a folder of label sub-folders needs ``--dataset labels``)."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..errors import DataError
from .base import Protocol, Source, Triplet
from .cirr import CIRR, is_cirr_root
from .fashioniq import CATEGORIES, FashionIQ, is_fashioniq_root
from .folder import ImageCatalog
from .hub import HUB_PREFIX, HubDataset, is_datasets_folder
from .labels import LabelledImages
from .triplet_files import TripletFile

KINDS = ("auto", "fashioniq", "cirr", "triplets", "labels", "folder", "hf")
HUB_OPTIONS = ("image_column", "id_column", "category_column", "caption_column", "reference_column",
               "target_column", "streaming")

__all__ = ["Protocol", "Source", "Triplet", "KINDS", "open_source", "add_source_args", "source_from_args"]


def detect_kind(data: str) -> str:
    """What ``data`` is: a Hub data set, a triplet file, a datasets folder, a CIRR or FashionIQ root, or else a
    folder of images."""
    if data.startswith(HUB_PREFIX):
        return "hf"
    path = Path(data)
    if path.suffix.lower() in (".jsonl", ".csv"):
        if not path.is_file():
            raise DataError(f"--data {data} does not exist")
        if path.suffix.lower() == ".jsonl":
            return "triplets"
        with open(path, encoding="utf-8") as f:
            head = next(csv.reader(f), [])
        if "reference" in head:
            return "triplets"
        if "label" in head:
            return "labels"
        raise DataError(f"{data}: the CSV header names neither triplets (reference, caption, target, ...) nor "
                        f"labelled images ('image' and 'label'); got {head}")
    if not path.exists():
        raise DataError(f"--data {data} does not exist")
    if is_cirr_root(path):
        return "cirr"
    if is_fashioniq_root(path):
        return "fashioniq"
    if is_datasets_folder(path):
        return "hf"
    return "folder"


def open_source(data: str, kind: str = "auto", categories: str | None = None, images: str | None = None,
                split_by: str = "label", **hub_options) -> Source:
    """The data set ``data`` names (see the module docstring); ``categories`` narrows FashionIQ, ``images`` is
    the image folder of a triplet or label file, ``split_by`` how labelled images are split (by label or by
    image), ``hub_options`` name the columns of a Hugging Face data set."""
    data = str(data)
    kind = detect_kind(data) if kind in ("auto", None) else kind
    if kind == "fashioniq":
        return FashionIQ(data, categories or ",".join(CATEGORIES))
    if kind == "cirr":
        return CIRR(data)
    if kind == "triplets":
        return TripletFile(data, images)
    if kind == "labels":
        return LabelledImages(data, images, split_by)
    if kind == "folder":
        return ImageCatalog(data)
    if kind == "hf":
        return HubDataset(data, **{k: v for k, v in hub_options.items() if v is not None})
    raise DataError(f"unknown --dataset {kind!r}; choose from {', '.join(KINDS)}")


def reopen(record: dict) -> Source:
    """The source a ``Source.record()`` describes."""
    record = dict(record)
    kind, data = record.pop("kind"), record.pop("data")
    categories = record.pop("categories", None)
    return open_source(data, kind, ",".join(categories) if categories else None, record.pop("images", None),
                       record.pop("split_by", "label"), **record)


def add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data and what opens it, as every tool names them."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required,
                       help="FashionIQ root, CIRR root, triplets .jsonl/.csv, image folder, datasets folder or "
                            "hf://datasets/OWNER/NAME")
    group.add_argument("--dataset", choices=KINDS, default="auto", help="what --data is (default: recognised)")
    group.add_argument("--categories", help="FashionIQ: the categories to use (default: all three)")
    group.add_argument("--images", help="the image folder of a triplet or label file (default: the file's folder)")
    group.add_argument("--split-by", choices=["label", "image"], default="label",
                       help="labelled images: hold out whole labels (default) or some images of each label")
    for option in HUB_OPTIONS[:-1]:
        group.add_argument(f"--{option.replace('_', '-')}", help=f"Hugging Face data sets: the {option.split('_')[0]} "
                           f"column")
    group.add_argument("--streaming", action="store_true", help="Hugging Face Hub: stream (index building only)")


def source_from_args(args: argparse.Namespace) -> Source:
    return open_source(args.data, args.dataset, args.categories, args.images, args.split_by,
                       **{k: getattr(args, k) for k in HUB_OPTIONS})
