"""Re-ranking (``clip4cir train-reranker``): train a re-ranker of the first stage's candidates on cached features
of the frozen encoder (combiner.reranking)."""
from __future__ import annotations

from collections.abc import Sequence

import combiner.reranking
from clip4cir.commands.common import MAX_WIDTH, add_title_args, train, training_parser, triplet_run_config, whole
from clip4cir.core.artifacts import input_file
from clip4cir.core.errors import ModelError
from combiner.reranking import RerankerConfig, RerankerTask


def parse_args(argv: Sequence[str] | None) -> RerankerConfig:
    parser = training_parser("clip4cir train-reranker", combiner.reranking.__doc__, RerankerConfig)
    parser.add_argument("--combiner", help="the first stage's Combiner (default: the Sum of the features)")
    parser.add_argument("--depth", type=whole(2, 1000), default=RerankerConfig.depth,
                        help="how many first candidates it re-scores")
    parser.add_argument("--width", type=whole(8, MAX_WIDTH), default=RerankerConfig.width)
    parser.add_argument("--heads", type=whole(1, 64), default=RerankerConfig.heads)
    parser.add_argument("--cache-dir", help="feature cache (default: OUTPUT/feature_cache)")
    add_title_args(parser)
    config = triplet_run_config(parser, RerankerConfig, argv)
    if config.width % config.heads:
        raise ValueError(f"--width {config.width} must be a multiple of --heads {config.heads}")
    if config.combiner is not None:
        input_file(config.combiner, "--combiner", ModelError)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return train(RerankerTask, parse_args(argv))
