"""Shared command-line plumbing: the model arguments every tool takes, and turning errors into exit codes."""
from __future__ import annotations

import argparse
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
