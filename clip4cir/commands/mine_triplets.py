"""Mine triplets from a catalog's titles (``clip4cir mine-triplets``): for a shop
with image-text pairs and no triplets, write a triplet file that stage one and the Combiner train on as they are
(clip4cir.training.triplet_mining)."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from clip4cir.commands.common import (
    WORKERS,
    add_model_args,
    add_source_args,
    check_encoder_given,
    encoder_from_args,
    source_options,
    whole,
)
from clip4cir.data.sources.base import check_images_readable, detect_kind
from clip4cir.training import triplet_mining
from clip4cir.training.triplet_mining import check_output, mine_triplets, plan_triplets

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip4cir mine-triplets",
                                     description=f"{__doc__}\n\n{triplet_mining.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="the triplet file to write (.jsonl; must not exist)")
    parser.add_argument("--per-reference", type=whole(1, 100), default=2,
                        help="one-word edits drawn for each image's title (default 2)")
    parser.add_argument("--workers", type=WORKERS, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_encoder_given(args.model, args.clip_checkpoint)
    check_output(args.output)
    if args.dataset == "auto" and detect_kind(args.data) == "folder":
        args.dataset = "pairs"  # a folder no other kind recognises: images with sidecar texts
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source = source_options(args).open()
    plan = plan_triplets(source, args.per_reference, args.seed)  # the titles first: text only
    check_images_readable(source, [i for split in plan for i in source.texts(split)])
    counts = mine_triplets(encoder_from_args(args), source, plan, args.output, args.workers, not args.quiet)
    folder = "" if source.images.root.resolve() == Path(args.output).resolve().parent else \
        f" --images {source.images.root}"
    log.info("wrote %s: %s train and %s val triplets; train on them: python -m clip4cir train --data %s%s "
             "--output RUN (then clip4cir train-combiner)", args.output, f"{counts['train']:,}",
             f"{counts['val']:,}", args.output, folder)
    return 0
