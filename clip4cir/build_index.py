"""Building a catalog index (``scripts/build_index.py``): encode a FashionIQ root or any image folder, index it.

Encoding is most of the work. It runs in chunks that are saved as they finish (in a hidden folder beside the
output, removed when the index is committed), so an interrupted build resumes without encoding a finished
chunk again; under ``torchrun`` every process encodes its share of the chunks (one GPU each, across machines
too) and the first assembles the index. Progress is shown with an ETA.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .artifacts import atomic_write
from .catalog import catalog_items, encode_items, items_fingerprint
from .category_probe import train_probe
from .cli import WORKERS, add_model_args, encoder_from_args, number, run, whole
from .distributed import Dist, barrier, run_distributed
from .encoder import CLIPEncoder
from .errors import CatalogIndexError, Clip4CirError, DataError
from .fingerprints import digest
from .index import DEFAULTS, KINDS, METRICS, CatalogIndex, Item
from .index_tuning import choose_kind
from .vector_store import check_pq_m
from .sources import Source, add_source_args, source_from_args

CHUNK = 4096  # images per saved chunk of features
PROBE_SAMPLE = 50_000  # the category probe learns from at most this many items


def _chunk_file(work: Path, i: int) -> Path:
    return work / f"chunk-{i:06d}.pt"


def encode_catalog(encoder: CLIPEncoder, items: Sequence[Item], source: Source, work: Path, batch_size: int = 64,
                   workers: int = 0, progress: bool = True, ddp: Dist = Dist(), chunk: int = CHUNK
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Raw features of the items, encoded in chunks saved in ``work`` (a chunk already there is not encoded
    again), this process taking every ``world_size``-th chunk. Returns, on the main process once all are done,
    the positions of the readable items and their features (memory-mapped from ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    chunks = range((len(items) + chunk - 1) // chunk)
    mine = [i for i in chunks if i % ddp.world_size == ddp.rank]
    todo = [i for i in mine if not _chunk_file(work, i).is_file()]
    bar = tqdm(total=sum(min(chunk, len(items) - i * chunk) for i in mine), desc="encoding images", unit="img",
               disable=not progress, smoothing=0.1)
    bar.update(bar.total - sum(min(chunk, len(items) - i * chunk) for i in todo))  # resumed: done before
    for i in todo:
        part = items[i * chunk:(i + 1) * chunk]
        kept, features, _ = encode_items(encoder, part, source, batch_size, workers, progress=False, start=i * chunk)
        positions = {item.id: p for p, item in enumerate(part)}
        atomic_write(_chunk_file(work, i), lambda tmp: torch.save(
            {"positions": torch.tensor([i * chunk + positions[item.id] for item in kept], dtype=torch.long),
             "features": torch.from_numpy(features)}, tmp))
        bar.update(len(part))
    bar.close()
    barrier()
    if not ddp.is_main:
        return np.zeros(0, dtype=np.int64), np.zeros((0, encoder.dim), dtype=np.float32)
    parts = [torch.load(_chunk_file(work, i), weights_only=True) for i in chunks]
    positions = np.concatenate([p["positions"].numpy() for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    features = open_memmap(work / "features.npy", mode="w+", dtype=np.float32, shape=(len(positions), encoder.dim))
    start = 0
    for part in parts:
        features[start:start + len(part["positions"])] = part["features"].numpy()
        start += len(part["positions"])
    features.flush()
    return positions, features


def build_index(encoder: CLIPEncoder, source: Source, items: Sequence[Item], output: str | os.PathLike,
                kind: str = "flat",
                metric: str = "cosine", batch_size: int = 64, workers: int = 0, progress: bool = True,
                record: dict | None = None, target_recall: float | None = None, memory_budget: int | None = None,
                ddp: Dist = Dist(), message: Callable[[str], None] = print, chunk: int = CHUNK, **knobs
                ) -> tuple[CatalogIndex | None, list[Item]]:
    """Encode the items and write their index to ``output``; returns the index (None on processes other than the
    main one) and the items whose image could not be read. DataError when none can be read: an empty index is
    never a result, and an index already at ``output`` stays as it was."""
    output = CatalogIndex.check_destination(output)
    work = output.parent / f".{output.name}.encoding" / digest(encoder.fingerprint(), items_fingerprint(items))
    if ddp.is_main:
        clear_other_encodings(work)
    try:
        return _build(encoder, source, items, output, work, kind, metric, batch_size, workers, progress, record,
                      target_recall, memory_budget, ddp, message, chunk, **knobs)
    except Clip4CirError:  # refused: nothing to resume (an interruption keeps the chunks for the next run)
        if ddp.is_main:
            shutil.rmtree(work.parent, ignore_errors=True)
        raise


def clear_other_encodings(work: Path) -> None:
    """Remove the encodings an earlier build of this output left for another encoder or catalog: they can never
    be resumed (this build's own, ``work``, is resumed)."""
    if work.parent.is_dir():
        for other in work.parent.iterdir():
            if other != work:
                shutil.rmtree(other, ignore_errors=True)


def _build(encoder: CLIPEncoder, source: Source, items: Sequence[Item], output: Path, work: Path, kind: str,
           metric: str, batch_size: int, workers: int, progress: bool, record: dict | None,
           target_recall: float | None, memory_budget: int | None, ddp: Dist, message: Callable[[str], None],
           chunk: int, **knobs) -> tuple[CatalogIndex | None, list[Item]]:
    positions, features = encode_catalog(encoder, items, source, work, batch_size, workers, progress, ddp, chunk)
    if not ddp.is_main:
        return None, []
    kept = [items[p] for p in positions]
    readable = set(positions.tolist())
    unreadable = [item for p, item in enumerate(items) if p not in readable]
    if not kept:
        shown = ", ".join(item.path for item in unreadable[:3])
        raise DataError(f"none of the {len(items):,} images could be read (first: {shown}); no index was written")
    kind = choose_kind(len(kept), encoder.dim, memory_budget) if kind == "auto" else kind
    sample = np.sort(np.random.default_rng(0).permutation(len(kept))[:PROBE_SAMPLE])
    probe = train_probe(np.asarray(features[sample]), [kept[i].categories for i in sample])
    folders = sorted({os.path.dirname(item.path) for item in kept if os.path.isabs(item.path)})  # the app serves
    index = CatalogIndex.create(output, kept, features, kind=kind, metric=metric, encoder=encoder.record(),
                                source={"data": source.record(), **(record or {}), "items": len(kept),
                                        "fingerprint": items_fingerprint(kept), "folders": folders},
                                probe=probe, target_recall=target_recall, progress=message if progress else None,
                                **knobs)
    del features
    shutil.rmtree(work.parent)  # the chunks this build made, now in the committed index
    return index, unreadable


def unreadable_reason(source: Source, item: Item) -> str:
    """Why an item's image could not be read (it is read again to tell)."""
    try:
        source.load_image(item.id)
    except DataError as e:
        return str(e)
    return "it could not be read while encoding"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build_index.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="index folder to write")
    parser.add_argument("--splits", help="comma-separated, e.g. train,val,test (default: the validation split of a "
                                         "data set with triplets, all of a plain image folder)")
    parser.add_argument("--kind", choices=("auto",) + KINDS, default="auto",
                        help="auto: flat up to 100k items, IVF with 8-bit codes while they fit --memory-budget, "
                             "else IVF-PQ (approximate kinds re-rank exactly)")
    parser.add_argument("--target-recall", type=number(0, 1, low_open=True), default=0.95,
                        help="calibrate nprobe/efSearch to this Recall@10 against exact search (approximate kinds)")
    parser.add_argument("--memory-budget", type=number(0, 1e6, low_open=True),
                        help="GB the index's codes may use (default: half the RAM)")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--nlist", type=whole(1), help="IVF lists (default 4·√N)")
    parser.add_argument("--pq-m", type=whole(1), help="IVF-PQ bytes per vector (default: dim/8)")
    parser.add_argument("--M", type=whole(2, 512), default=DEFAULTS["M"], help="HNSW links per node")
    parser.add_argument("--batch-size", type=whole(1), default=64)
    parser.add_argument("--chunk-size", type=whole(1), default=CHUNK,
                        help="images per saved chunk: what an interruption can lose, and the unit shared out to GPUs")
    parser.add_argument("--workers", type=WORKERS, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.model and not args.clip_checkpoint:
        raise ValueError("give the encoder: --model NAME [--pretrained TAG] or --clip-checkpoint PATH")
    return args


def build(args: argparse.Namespace, ddp: Dist, device: torch.device) -> int:
    start = time.perf_counter()
    CatalogIndex.check_destination(args.output)  # before any work: never replace what is not an index
    source = source_from_args(args)
    splits = [s for s in args.splits.split(",") if s] if args.splits else [source.protocol.val_split]
    for split in splits:
        source.check_split(split)
    if getattr(source, "streaming", False) and len(splits) > 1:
        raise ValueError("a streamed data set is indexed one split at a time (--splits NAME)")
    items = catalog_items(source, splits)
    if args.nlist is not None and not 1 <= args.nlist <= len(items):
        raise CatalogIndexError(f"--nlist {args.nlist} must be between 1 and the catalog's {len(items):,} images "
                                f"(default: 4·√N)")
    args.device = str(device)
    encoder = encoder_from_args(args)
    if args.pq_m is not None:
        check_pq_m(args.pq_m, encoder.dim)  # before the encoding, not after it
    knobs = {k: v for k, v in (("nlist", args.nlist), ("pq_m", args.pq_m), ("M", args.M)) if v is not None}
    budget = int(args.memory_budget * 2 ** 30) if args.memory_budget else None
    index, unreadable = build_index(encoder, source, items, args.output, args.kind, args.metric, args.batch_size,
                                    args.workers, not args.quiet and ddp.is_main, {"splits": splits},
                                    args.target_recall, budget, ddp, chunk=args.chunk_size, **knobs)
    if index is None:
        return 0
    for item in unreadable[:10]:
        print(f"skipped {item.path}: {unreadable_reason(source, item)}")
    if unreadable:
        print(f"skipped {len(unreadable):,} unreadable images of {len(items):,}")
    tuned = f", calibrated {index.tuning['effort']} for Recall@10 {index.tuning['recall']}" if index.tuning else ""
    print(f"indexed {len(index):,} images ({index.kind}, {index.metric}, {len(index.categories())} categories{tuned}) "
          f"with {encoder.describe()} in {time.perf_counter() - start:.1f}s -> {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_distributed(build, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run(main))
