"""Shared command-line plumbing: the model arguments every tool takes, and turning errors into exit codes."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .data import DataError
from .models import CLIPEncoder, ModelError, load_model, resolve_device


def add_model_args(parser: argparse.ArgumentParser, checkpoint_flag: str = "--clip-checkpoint") -> None:
    """--model/--pretrained/--clip-checkpoint/--device/--seed, as every tool names them."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", help="open_clip architecture, e.g. RN50, RN50x4, ViT-B-32, cir-tiny")
    group.add_argument("--pretrained", help="pretrained tag (e.g. openai) or weights file; none: seeded random init")
    group.add_argument(checkpoint_flag, dest="clip_checkpoint",
                       help="fine-tuned encoder: clip4cir .safetensors, CLIP4Cir tuned_clip_*.pt or OpenAI state dict")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--seed", type=int, default=0)


def add_run_args(parser: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float) -> None:
    """The arguments both training stages share (their defaults differ)."""
    from .data import CATEGORIES
    parser.add_argument("--data", required=True, help="FashionIQ-layout root")
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per process (× world size in all)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--save-best", action="store_true", help="keep best.safetensors (mean of avg R@10, R@50)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--max-steps", type=int, default=0, help="stop (resumably) after this many steps in all")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_run_args(args: argparse.Namespace) -> None:
    """Reject impossible values, and check the data exists, before anything is written or loaded."""
    from .data import DataError, load_triplets, parse_categories
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    args.categories = ",".join(parse_categories(args.categories))
    if not os.path.isdir(args.data):
        raise DataError(f"--data {args.data} does not exist")
    for category in args.categories.split(","):  # validation data must exist before hours of training
        load_triplets(args.data, category, "val")


def encoder_from_args(args: argparse.Namespace) -> CLIPEncoder:
    """The encoder the arguments name, on the device they ask for."""
    device = resolve_device(args.device)
    return load_model(args.model, args.pretrained, args.clip_checkpoint, seed=args.seed, device=device)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main; a bad input prints one clear line and gives exit status 2, not a traceback."""
    try:
        return main(argv)
    except (DataError, ModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
