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
    add_source_args(parser)
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per process (× world size in all)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--save-best", action="store_true",
                        help="keep best.safetensors (the data set's headline score: FashionIQ the mean of avg R@10 "
                             "and R@50, CIRR the mean of R@5 and Rs@1, labels MAP@R)")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also commit a checkpoint every N steps (besides the end of every epoch)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--max-steps", type=int, default=0, help="stop (resumably) after this many steps in all")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_run_values(args: argparse.Namespace) -> None:
    """Reject impossible values of the arguments every trainer takes, before anything is written or loaded."""
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("workers", "max_steps", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
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
    TripletDataset(source, "train")  # missing images are named here, not after an epoch
    TripletDataset(source, val)
    for category in source.categories() if source.protocol.per_category else [None]:
        GalleryDataset(source, val, [category] if category else None)
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


def check_output_file(path: str | None, flag: str) -> None:
    """Before the work whose result it will hold: the folder of an output file must exist, and the path must not
    be a folder."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{flag} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise DataError(f"{flag} {path}: the folder {target.parent} does not exist")


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
