"""Building a catalog index (``scripts/build_index.py``): encode a FashionIQ root or any image folder, index it."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Sequence

from .catalog import encode_items, fashioniq_items, folder_items, items_fingerprint
from .category_probe import train_probe
from .cli import add_model_args, encoder_from_args, run
from .data import CATEGORIES, SPLITS
from .encoder import CLIPEncoder
from .errors import CatalogIndexError, DataError
from .index import DEFAULTS, KINDS, METRICS, CatalogIndex, Item


def build_index(encoder: CLIPEncoder, items: Sequence[Item], kind: str = "flat", metric: str = "cosine",
                nlist: int | None = None, nprobe: int = DEFAULTS["nprobe"], M: int = DEFAULTS["M"],
                ef_search: int = DEFAULTS["ef_search"], batch_size: int = 64, workers: int = 0,
                progress: bool = True, source: dict | None = None) -> tuple[CatalogIndex, list[Item]]:
    """Encode the items and index them; returns the index and the items whose image could not be read.
    DataError when none can be read (an empty index is never a result)."""
    index = CatalogIndex(encoder.dim, kind, metric, nlist, nprobe, M, ef_search, encoder.record())
    kept, features, unreadable = encode_items(encoder, items, batch_size, workers, progress)
    if not kept:
        shown = ", ".join(item.path for item in unreadable[:3])
        raise DataError(f"none of the {len(items):,} images could be read (first: {shown}); no index was written")
    index.source = {**(source or {}), "items": len(kept), "fingerprint": items_fingerprint(kept)}
    index.add(kept, features)
    index.probe = train_probe(features, [item.categories for item in kept])
    return index, unreadable


def catalog_source(data: str | None, images: str | None, categories: str = ",".join(CATEGORIES),
                   splits: Sequence[str] = ("val",)) -> tuple[list[Item], dict]:
    """The items of a FashionIQ root (``data``) or an image folder (``images``), and a record of the source."""
    if data:
        return fashioniq_items(data, categories, splits), {"fashioniq": str(Path(data).resolve()),
                                                           "splits": list(splits)}
    return folder_items(images), {"images": str(Path(images).resolve())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_index.py", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="FashionIQ-layout root")
    source.add_argument("--images", help="any folder of images; first-level sub-folders are categories")
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="index folder to write")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="with --data")
    parser.add_argument("--splits", default="val", help="with --data: comma-separated, e.g. train,val,test")
    parser.add_argument("--kind", choices=KINDS, default="flat", help="flat (exact), ivf or hnsw")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--nlist", type=int, help="IVF lists (default 4·√N)")
    parser.add_argument("--nprobe", type=int, default=DEFAULTS["nprobe"])
    parser.add_argument("--M", type=int, default=DEFAULTS["M"], help="HNSW links per node")
    parser.add_argument("--ef-search", type=int, default=DEFAULTS["ef_search"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.model and not args.clip_checkpoint:
        raise ValueError("give the encoder: --model NAME [--pretrained TAG] or --clip-checkpoint PATH")
    splits = [s for s in args.splits.split(",") if s]
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    start = time.perf_counter()
    CatalogIndex.check_destination(args.output)  # before any work: never replace what is not an index
    items, source = catalog_source(args.data, args.images, args.categories, splits)
    if args.kind == "ivf" and args.nlist is not None and not 1 <= args.nlist <= len(items):
        raise CatalogIndexError(f"--nlist {args.nlist} must be between 1 and the catalog's {len(items):,} images "
                                f"(default: 4·√N)")
    encoder = encoder_from_args(args)
    index, unreadable = build_index(encoder, items, args.kind, args.metric, args.nlist, args.nprobe, args.M,
                                    args.ef_search, args.batch_size, args.workers, not args.quiet, source)
    for item in unreadable[:10]:
        print(f"skipped unreadable image {item.path}")
    if unreadable:
        print(f"skipped {len(unreadable):,} unreadable images of {len(items):,}")
    index.save(args.output)
    print(f"indexed {len(index):,} images ({args.kind}, {args.metric}, {len(index.categories())} categories) "
          f"with {encoder.describe()} in {time.perf_counter() - start:.1f}s -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
