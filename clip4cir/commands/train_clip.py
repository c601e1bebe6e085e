"""Stage one (``clip4cir train``): fine-tune the CLIP image and/or text encoder on
composed-retrieval triplets (clip4cir.training.stage_one)."""
from __future__ import annotations

from collections.abc import Sequence

from clip4cir.commands.common import add_title_args, add_tower_args, train, training_parser, triplet_run_config
from clip4cir.training import stage_one
from clip4cir.training.stage_one import StageOneConfig, StageOneTask


def parse_args(argv: Sequence[str] | None) -> StageOneConfig:
    parser = training_parser("clip4cir train", stage_one.__doc__, StageOneConfig)
    add_tower_args(parser, StageOneConfig)
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    add_title_args(parser)
    return triplet_run_config(parser, StageOneConfig, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return train(StageOneTask, parse_args(argv))
