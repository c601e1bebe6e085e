"""Learning image similarity from labels (``clip4cir train-labels``): fine-tune an
image encoder with a metric-learning loss on labelled images (clip4cir.training.labels)."""
from __future__ import annotations

from collections.abc import Sequence

from clip4cir.commands.common import (
    MAX_WIDTH,
    POSITIVE,
    check_run_config,
    config_from_args,
    number,
    train,
    training_parser,
    whole,
)
from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import check_images_readable
from clip4cir.data.sources.labels import LabelledImages
from clip4cir.training import labels
from clip4cir.training.labels import LabelConfig, LabelTask
from clip4cir.training.metric_losses import DEFAULT_LOSS, LOSSES


def parse_args(argv: Sequence[str] | None) -> LabelConfig:
    parser = training_parser("clip4cir train-labels", labels.__doc__, LabelConfig)
    parser.add_argument("--loss", choices=LOSSES.names(), default=DEFAULT_LOSS,
                        help="the metric-learning loss (the default measured best: benchmark/README.md)")
    parser.add_argument("--m-per-class", type=whole(2), default=4, help="images of each label in a batch")
    parser.add_argument("--embed-dim", type=whole(1, MAX_WIDTH), default=128,
                        help="timm encoders: the projection's size")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=1e-4)
    parser.add_argument("--proxy-lr-factor", type=POSITIVE, default=None,
                        help="proxy-based losses: the proxies' learning rate is this times --lr (default: the loss's)")
    args = parser.parse_args(argv)
    if args.dataset == "auto":
        args.dataset = "labels"
    config = config_from_args(LabelConfig, args)
    check_run_config(config)
    source = config.source.open()
    if not isinstance(source, LabelledImages):
        raise DataError(f"--data {config.source.data} is not a set of labelled images (a folder per label, or "
                        f"image,label rows): it is {source.describe()}")
    check_images_readable(source, [i for split in source.splits() for i in source.gallery(split)])
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return train(LabelTask, parse_args(argv))
