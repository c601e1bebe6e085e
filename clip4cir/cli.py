"""Shared command-line plumbing: the arguments every tool takes, the checks made before any long work starts, and
turning errors into one clear line and exit status 2."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .data import GalleryDataset, TripletDataset
from .device import resolve_device
from .encoder import Encoder
from .errors import DataError
from .factory import load_model
from .sources import Source, add_source_args, source_from_args
from .sources.base import check_images_readable


MAX_SEED = 2 ** 31 - 1
MAX_WIDTH = 65_536  # the largest layer width a flag may ask for (a Combiner of 1024-d features: 0.3 GB a layer)


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``); argparse names the flag in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low:,} to {high:,}" if high is not None else f"at least {low:,}"
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {text}")
        return value
    parse.__name__ = "whole number"
    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval (``low_open``/``high_open``: the end excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE = number(0, math.inf, low_open=True, high_open=True)
WORKERS = whole(0, 256)


def add_model_args(parser: argparse.ArgumentParser, checkpoint_flag: str = "--clip-checkpoint") -> None:
    """--model/--pretrained/--clip-checkpoint/--device/--seed, as every tool names them."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", help="open_clip architecture, e.g. RN50, RN50x4, ViT-B-32, cir-tiny")
    group.add_argument("--pretrained", help="pretrained tag (e.g. openai) or weights file; none: seeded random init")
    group.add_argument(checkpoint_flag, dest="clip_checkpoint",
                       help="fine-tuned encoder: clip4cir .safetensors, CLIP4Cir tuned_clip_*.pt or OpenAI state dict")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--seed", type=whole(0, MAX_SEED), default=0)


def add_run_args(parser: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float) -> None:
    """The arguments both training stages share (their defaults differ)."""
    add_source_args(parser)
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--epochs", type=whole(1), default=epochs)
    parser.add_argument("--batch-size", type=whole(1), default=batch_size, help="per process (× world size in all)")
    parser.add_argument("--lr", type=POSITIVE, default=lr)
    parser.add_argument("--val-every", type=whole(1), default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--save-best", action="store_true",
                        help="keep best.safetensors (the data set's headline score: FashionIQ the mean of avg R@10 "
                             "and R@50, CIRR the mean of R@5 and Rs@1, labels MAP@R)")
    parser.add_argument("--save-every", type=whole(0), default=0,
                        help="also commit a checkpoint every N steps (besides the end of every epoch)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    parser.add_argument("--workers", type=WORKERS, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--max-steps", type=whole(0), default=0, help="stop (resumably) after this many steps in all")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_run_values(args: argparse.Namespace) -> None:
    """Reject impossible values of the arguments every trainer takes, before anything is written or loaded."""
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise DataError(f"--output {args.output} is a file; give a folder for the run")
    if getattr(args, "streaming", False):
        raise ValueError("--streaming reads images in order: it builds indexes; training needs random access")


def check_run_args(args: argparse.Namespace) -> Source:
    """Reject impossible values, open the data set, and check that every file the run will read exists (the
    training triplets, the validation triplets and every validation gallery image), before anything is written
    or loaded. Returns the data set."""
    check_run_values(args)
    source = source_from_args(args)
    val = source.protocol.val_split
    images = []
    for split in ("train", val):  # missing images are named here, not after an epoch
        images += [i for t in TripletDataset(source, split).triplets for i in (t.reference, t.target) if i]
    for category in source.categories() if source.protocol.per_category else [None]:
        images += GalleryDataset(source, val, [category] if category else None).ids
    check_images_readable(source, images)  # and unreadable ones (truncated, not images)
    return source


def benchmark_args(argv: Sequence[str] | None, prog: str, doc: str, configs: dict, default: str, writes: str,
                   more: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[argparse.Namespace, dict, Path]:
    """The options every benchmark command takes (``--config``, ``--out``, an existing folder, and ``--work``, a
    scratch folder), parsed: the arguments, the chosen config and the output folder."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(configs), default=default)
    parser.add_argument("--out", default="benchmark", help=f"folder for {writes}")
    parser.add_argument("--work", help="scratch folder (default: a temporary folder)")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out} does not exist")
    return args, configs[args.config], out


def encoder_from_args(args: argparse.Namespace) -> Encoder:
    """The encoder the arguments name, on the device they ask for."""
    device = resolve_device(args.device)
    return load_model(args.model, args.pretrained, args.clip_checkpoint, seed=args.seed, device=device)


def error_line(error: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker, the original error's own line
    rather than the worker's traceback."""
    message = str(error)
    if "Original Traceback" in message:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        last = lines[-1]
        message = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    return message


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main; a bad input prints one clear line and gives exit status 2, not a traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:  # the project's errors are ValueErrors
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
