"""Image-text training (``clip4cir train-pairs``): adapt CLIP to a catalog's own
image-text pairs, titles or descriptions, before any triplet exists (clip4cir.training.pairs)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from clip4cir.commands.common import (
    POSITIVE,
    add_tower_args,
    check_run_config,
    config_from_args,
    train,
    training_parser,
)
from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import check_images_readable, detect_kind
from clip4cir.training import pairs
from clip4cir.training.pairs import PairsConfig, PairsTask
from clip4cir.training.stage_one import check_batch_fits


def parse_args(argv: Sequence[str] | None) -> PairsConfig:
    parser = training_parser("clip4cir train-pairs", pairs.__doc__, PairsConfig)
    add_tower_args(parser, PairsConfig)
    parser.add_argument("--learn-temperature", action=argparse.BooleanOptionalAction, default=True,
                        help="learn the logit scale, from the model's own (default: yes, as CLIP does)")
    parser.add_argument("--temperature-lr", type=POSITIVE, default=1e-3, help="the learned logit scale's own rate")
    args = parser.parse_args(argv)
    if args.dataset == "auto" and detect_kind(args.data) == "folder":
        args.dataset = "pairs"  # a folder no other kind recognises: images with sidecar texts
    config = config_from_args(PairsConfig, args)
    check_run_config(config)
    source = config.source.open()
    val = source.protocol.val_split
    if val == "train":
        raise DataError(f"--data {config.source.data}: {source.describe()} has no held-out split to validate on "
                        f"(give it a val or validation split)")
    for split in ("train", val):
        if split not in source.splits() or not source.texts(split):
            raise DataError(f"--data {config.source.data}: {source.describe()} has no {split} image-text pairs "
                            f"(image,text rows, images with sidecar .txt files, or a data set with a caption column)")
    check_batch_fits(config.batch_size, int(os.environ.get("WORLD_SIZE", "1")), len(source.texts("train")),
                     "training images")
    check_images_readable(source, [i for split in ("train", val) for i in source.texts(split)])
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return train(PairsTask, parse_args(argv))
