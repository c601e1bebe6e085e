"""Build a search index (``clip4cir index``): encode the images of a data set's
splits (or any image folder) with an encoder, index them (clip4cir.retrieval.building). Under ``torchrun`` every
process encodes its share; an interrupted build resumes without encoding a finished chunk again."""
from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence

import torch

from clip4cir.commands.common import (
    WORKERS,
    add_model_args,
    add_source_args,
    check_encoder_given,
    encoder_from_args,
    number,
    source_options,
    whole,
)
from clip4cir.core.distributed import Dist, run_distributed
from clip4cir.core.errors import CatalogIndexError
from clip4cir.models.combiner import combining_function
from clip4cir.retrieval.building import CHUNK, BuildOptions, build_index, unreadable_reason
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.index import DEFAULTS, KINDS, METRICS, CatalogIndex
from clip4cir.retrieval.milvus_index import TOKEN_ENV, MilvusIndex
from clip4cir.retrieval.stores import STORES
from clip4cir.retrieval.tuning import describe_tuning
from clip4cir.retrieval.vector_store import check_pq_m


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip4cir index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="index folder to write")
    parser.add_argument("--splits", help="comma-separated, e.g. train,val,test (default: the validation split of a "
                                         "data set with triplets, all of a plain image folder)")
    parser.add_argument("--kind", choices=("auto",) + KINDS.names(), default="auto",
                        help="auto: flat up to 100k items, IVF with 8-bit codes while they fit --memory-budget, "
                             "else IVF-PQ (approximate kinds re-rank exactly)")
    parser.add_argument("--target-recall", type=number(0, 1, low_open=True), default=0.95,
                        help="calibrate nprobe/efSearch to this Recall@10 against exact search (approximate kinds)")
    parser.add_argument("--combiner", help="the stage-two checkpoint the index will serve with: calibration makes "
                                           "its composed queries with it (default: the sum)")
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
    parser.add_argument("--store", choices=STORES.names(), default="faiss",
                        help="faiss: vectors in the index folder (one machine); milvus: in a Milvus collection the "
                             "folder names, served by any number of replicas (pip install .[milvus])")
    parser.add_argument("--milvus-uri", help="the Milvus server, e.g. http://127.0.0.1:19530 (token: "
                                             f"${TOKEN_ENV}, never a command-line argument)")
    parser.add_argument("--collection", type=collection_name, help="the Milvus collection to fill (created, or "
                                                                     "resumed after an interruption)")
    parser.add_argument("--relative-paths", action="store_true",
                        help="store image paths relative to the index folder, to move or ship the index and the "
                             "images together")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    check_encoder_given(args.model, args.clip_checkpoint)
    if (args.store == "milvus") != bool(args.milvus_uri and args.collection) or \
            (args.store != "milvus" and (args.milvus_uri or args.collection)):
        raise ValueError("--store milvus takes --milvus-uri URI and --collection NAME (and only it does)")
    return args


def collection_name(text: str) -> str:
    """A Milvus collection name: a letter or underscore, then letters, digits or underscores (255 at most)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Milvus collection name (a letter or _, then letters, "
                                         f"digits or _)")
    return text


def build(args: argparse.Namespace, ddp: Dist, device: torch.device) -> int:
    start = time.perf_counter()
    CatalogIndex.check_destination(args.output)  # before any work: never replace what is not an index
    source = source_options(args).open()
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
    combine = combining_function(encoder, args.combiner, "combiner" if args.combiner else "sum")
    if args.store == "milvus" and ddp.is_main:
        MilvusIndex.preflight(args.milvus_uri, args.collection, args.kind)
    options = BuildOptions(args.kind, args.metric, args.target_recall,
                           int(args.memory_budget * 2 ** 30) if args.memory_budget else None, args.nlist, args.pq_m,
                           args.M, args.batch_size, args.workers, args.chunk_size, not args.quiet and ddp.is_main,
                           combine, args.relative_paths, args.store,
                           {"uri": args.milvus_uri, "collection": args.collection} if args.store == "milvus" else {})
    index, unreadable = build_index(encoder, source, items, args.output, options, {"splits": splits}, ddp)
    if index is None:
        return 0
    for item in unreadable[:10]:
        print(f"skipped {item.path}: {unreadable_reason(source, item)}")
    if unreadable:
        print(f"skipped {len(unreadable):,} unreadable images of {len(items):,}")
    print(f"indexed {len(index):,} images ({index.kind}, {index.metric}, {len(index.categories())} categories) "
          f"with {encoder.describe()} in {time.perf_counter() - start:.1f}s -> {args.output}")
    if index.tuning:
        print(describe_tuning(index.tuning))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_distributed(lambda ddp, device: build(args, ddp, device), args.device)
