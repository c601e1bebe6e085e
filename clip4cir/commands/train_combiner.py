"""Stage two (``clip4cir train-combiner``): train the Combiner on cached features
of the frozen encoders (combiner.stage_two)."""
from __future__ import annotations

from collections.abc import Sequence

import combiner.stage_two
from clip4cir.commands.common import MAX_WIDTH, add_title_args, train, training_parser, triplet_run_config, whole
from combiner.stage_two import StageTwoConfig, StageTwoTask


def parse_args(argv: Sequence[str] | None) -> StageTwoConfig:
    parser = training_parser("clip4cir train-combiner", combiner.stage_two.__doc__, StageTwoConfig)
    parser.add_argument("--proj-dim", type=whole(1, MAX_WIDTH), default=None,
                        help="projection dim P (default 4 × feature dim)")
    parser.add_argument("--hidden-dim", type=whole(1, MAX_WIDTH), default=None,
                        help="hidden dim H (default 8 × feature dim)")
    parser.add_argument("--cache-dir", help="feature cache (default: OUTPUT/feature_cache)")
    add_title_args(parser)
    parser.add_argument("--reencode", action="store_true", help="encode every batch instead of caching features")
    config = triplet_run_config(parser, StageTwoConfig, argv)
    if config.reencode and config.gallery_negatives:
        raise ValueError("--gallery-negatives needs cached features: leave out --reencode or --gallery-negatives")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return train(StageTwoTask, parse_args(argv))
