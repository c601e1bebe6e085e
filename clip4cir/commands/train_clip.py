"""Stage one (``scripts/train_clip.py``, ``clip4cir-train``): fine-tune the CLIP image and/or text encoder on
composed-retrieval triplets (clip4cir.training.stage_one)."""
from __future__ import annotations

from typing import Sequence

from clip4cir.commands.common import number, run, train, training_parser, triplet_run_config
from clip4cir.models.transforms import PREPROCESS_KINDS
from clip4cir.training import stage_one
from clip4cir.training.stage_one import ENCODER_CHOICES, StageOneConfig, StageOneTask


def parse_args(argv: Sequence[str] | None) -> StageOneConfig:
    parser = training_parser("train_clip.py", stage_one.__doc__, StageOneConfig)
    parser.add_argument("--encoder", choices=ENCODER_CHOICES, default="both", help="which towers to fine-tune")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=0.01)
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--preprocess", choices=PREPROCESS_KINDS, default="targetpad")
    parser.add_argument("--target-ratio", type=number(1, 100), default=1.25,
                        help="targetpad: pad images whose aspect ratio exceeds this")
    return triplet_run_config(parser, StageOneConfig, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return train(StageOneTask, parse_args(argv))


def console() -> int:
    return run(main)
