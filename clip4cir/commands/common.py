"""Shared command-line plumbing (every argparse parser of the project lives in this package): the arguments the
tools share, the checks made before any long work starts, turning parsed arguments into a library config, and
turning errors into one clear line and exit status 2."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from clip4cir.core.device import resolve_device
from clip4cir.core.distributed import run_distributed
from clip4cir.core.errors import DataError
from clip4cir.data.datasets import check_triplet_data
from clip4cir.data.sources import SOURCES, SourceOptions
from clip4cir.models.encoder import Encoder
from clip4cir.models.factory import load_model
from clip4cir.models.transforms import PREPROCESS_KINDS
from clip4cir.training.config import RunConfig
from clip4cir.training.recipes import DEFAULT_RECIPE, RECIPES
from clip4cir.training.stage_one import ENCODER_CHOICES
from clip4cir.training.trainer import Trainer, TrainingTask

C = TypeVar("C", bound=RunConfig)
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


def add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data and what opens it, as every tool names them."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required,
                       help="FashionIQ root, CIRR root, triplets .jsonl/.csv, image folder, datasets folder or "
                            "hf://datasets/OWNER/NAME")
    group.add_argument("--dataset", choices=("auto",) + SOURCES.names(), default="auto",
                       help="what --data is (default: recognised)")
    group.add_argument("--categories", help="FashionIQ: the categories to use (default: all three)")
    group.add_argument("--images", help="the image folder of a triplet or label file (default: the file's folder)")
    group.add_argument("--split-by", choices=["label", "image"], default="label",
                       help="labelled images: hold out whole labels (default) or some images of each label")
    for column in ("image", "id", "category", "caption", "reference", "target"):
        group.add_argument(f"--{column}-column", help=f"Hugging Face data sets: the {column} column")
    group.add_argument("--streaming", action="store_true", help="Hugging Face Hub: stream (index building only)")


def add_title_args(parser: argparse.ArgumentParser) -> None:
    """--title-template, for the commands that read composed queries' captions (both stages, the re-ranker,
    evaluation)."""
    parser.add_argument("--title-template", metavar="TEMPLATE",
                        help="title-aware queries: put each reference's title around its caption, e.g. "
                             "'{title} that {caption}' (the titles of pairs.jsonl beside the data; a model trained "
                             "so is evaluated and served so; measured: benchmark/README.md)")


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The data set the arguments name (the options a command does not take: their defaults)."""
    return SourceOptions(**{f.name: getattr(args, f.name) for f in fields(SourceOptions) if hasattr(args, f.name)})


def add_recipe_args(parser: argparse.ArgumentParser, stage: int) -> None:
    """--recipe and each of its components as a flag of its own (see clip4cir.training.recipes)."""
    group = parser.add_argument_group("recipe")
    group.add_argument("--recipe", choices=RECIPES.names(), default=DEFAULT_RECIPE,
                       help="clip4cir: the paper exactly; plus: this project's components (measured below it: "
                            "benchmark/README.md)")
    flag = argparse.BooleanOptionalAction
    group.add_argument("--symmetric", action=flag, default=None, help="add the target→query loss")
    group.add_argument("--learn-temperature", action=flag, default=None, help="learn the logit scale (from 100)")
    group.add_argument("--temperature-lr", type=POSITIVE, default=1e-3,
                       help="the learned logit scale's own learning rate (CLIP's own training gives it one)")
    group.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=None,
                       help="label smoothing of the cross-entropy")
    group.add_argument("--hard-negatives", action=flag, default=None,
                       help="batches of one category (same-kind negatives); data sets without categories ignore it")
    group.add_argument("--caption-augmentation", action=flag, default=None,
                       help="draw one of a sample's caption variants each epoch (the paper's; on in every recipe)")
    if stage == 2:
        group.add_argument("--gallery-negatives", action=flag, default=None,
                           help="every training image is a negative, not only the batch's targets")
        group.add_argument("--blend", action=flag, default=None,
                           help="fuse Combiner and sum scores, the weight chosen on validation")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """A run config from parsed arguments: every field the arguments have (the data set's options gathered)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "source" and hasattr(args, f.name)}
    return cls(source=source_options(args), **values)


def triplet_run_config(parser: argparse.ArgumentParser, config: type[C], argv: Sequence[str] | None) -> C:
    """The config of a run on triplets: the recipe's arguments added, the command line parsed, the settings and
    the data checked before any work."""
    add_recipe_args(parser, config.stage)
    made = config_from_args(config, parser.parse_args(argv))
    check_triplet_run(made)
    return made


def train(task: type[TrainingTask], config: RunConfig) -> int:
    """Run a training task under torchrun when there is one (each process opens the data set itself)."""
    def fit(ddp, device) -> int:
        Trainer(task(config, config.source.open(), ddp, device)).fit()
        return 0
    return run_distributed(fit, config.device)


def add_model_args(parser: argparse.ArgumentParser, checkpoint_flag: str = "--clip-checkpoint") -> None:
    """--model/--pretrained/--clip-checkpoint/--device/--seed, as every tool names them."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", help="open_clip architecture, e.g. RN50, RN50x4, ViT-B-32, cir-tiny")
    group.add_argument("--pretrained", help="pretrained tag (e.g. openai) or weights file; none: seeded random init")
    group.add_argument(checkpoint_flag, dest="clip_checkpoint",
                       help="fine-tuned encoder: clip4cir .safetensors, CLIP4Cir tuned_clip_*.pt or OpenAI state dict")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--seed", type=whole(0, MAX_SEED), default=0)


def training_parser(prog: str, doc: str | None, config: type[RunConfig]) -> argparse.ArgumentParser:
    """A training command's parser with the arguments every trainer takes (defaults: the config's)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, config.epochs, config.batch_size, config.lr)
    add_model_args(parser)
    return parser


def add_tower_args(parser: argparse.ArgumentParser, config: type[RunConfig]) -> None:
    """What training the CLIP towers takes (stage one, image-text pairs): which towers, weight decay and
    preprocessing (defaults: the config's)."""
    parser.add_argument("--encoder", choices=ENCODER_CHOICES, default="both", help="which towers to train")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=config.weight_decay)
    parser.add_argument("--preprocess", choices=PREPROCESS_KINDS, default=config.preprocess)
    parser.add_argument("--target-ratio", type=number(1, 100), default=config.target_ratio,
                        help="targetpad: pad images whose aspect ratio exceeds this")


def add_run_args(parser: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float | None) -> None:
    """The arguments every trainer takes (their defaults differ)."""
    add_source_args(parser)
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--epochs", type=whole(1), default=epochs)
    parser.add_argument("--batch-size", type=whole(1), default=batch_size, help="per process (× world size in all)")
    parser.add_argument("--lr", type=POSITIVE, default=lr,
                        help="the learning rate" + ("" if lr is not None else " (default: the loss's own)"))
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


def check_encoder_given(model: str | None, clip_checkpoint: str | None) -> None:
    """Every tool that encodes needs an architecture or a checkpoint."""
    if not (model or clip_checkpoint):
        raise ValueError("give the encoder: --model NAME [--pretrained TAG] or --clip-checkpoint PATH")


def check_run_config(config: RunConfig) -> None:
    """Reject impossible settings every trainer takes, before anything is written or loaded."""
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise DataError(f"--output {config.output} is a file; give a folder for the run")
    if config.source.streaming:
        raise ValueError("--streaming reads images in order: it builds indexes; training needs random access")
    check_encoder_given(config.model, config.clip_checkpoint)


def check_triplet_run(config: RunConfig) -> None:
    """The settings, then the data set: every file the run will read exists and is a complete image, before
    anything is written or a model loaded."""
    check_run_config(config)
    check_triplet_data(config.source.open())


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
    """Run a tool's main; a bad input prints one clear line and gives exit status 2, not a traceback. Library
    messages (clip4cir's logging) are shown as plain lines."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:  # the project's errors are ValueErrors
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
