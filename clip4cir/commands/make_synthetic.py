"""Generate synthetic data sets in the real layouts (``clip4cir make-synthetic fashioniq``, ``..._cirr.py``,
``..._identities.py``): each is committed as one folder (clip4cir.core.artifacts), so a folder of yours is never
written into and an interrupted run leaves no half data set."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clip4cir.commands.common import MAX_SEED, WORKERS, whole
from clip4cir.core.artifacts import write_folder
from clip4cir.core.errors import DataError
from clip4cir.data.synthetic import (
    CIRCO_SIZES,
    CIRR_SIZES,
    SIZES,
    SYNTHETIC_FORMAT,
    make_synthetic_circo,
    make_synthetic_cirr,
    make_synthetic_fashioniq,
    make_synthetic_identities,
)


@dataclass(frozen=True)
class Generator:
    """One generator: what it makes, its own arguments, how it draws into a folder, and its summary line."""

    description: str
    layout: str
    add_args: Callable[[argparse.ArgumentParser], None]
    make: Callable[[str, argparse.Namespace], dict]
    summary: Callable[[dict], str]


def sizes(choices: dict, help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    return lambda parser: parser.add_argument("--size", choices=list(choices), default="tiny", help=help_text)


def identity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identities", type=whole(2), default=300)
    parser.add_argument("--views", type=whole(2), default=8, help="photos of each identity")


GENERATORS = {
    "fashioniq": Generator(
        "Generate a synthetic catalog in FashionIQ's exact layout.", "captions/, image_splits/, images/",
        sizes(SIZES, "tiny: seconds, for tests; small: about 1,400 images; demo: a few thousand; heldout: a "
                     "4,800-image val split for benchmarks; full: FashionIQ's split sizes"),
        lambda out, a: make_synthetic_fashioniq(out, a.size, a.seed, a.workers),
        lambda c: f"{sum(v['triplets'] for v in c.values()):,} triplets and "
                  f"{sum(v['images'] for v in c.values()):,} split entries"),
    "cirr": Generator(
        "Generate a synthetic catalog in CIRR's exact layout.", "cirr/captions, cirr/image_splits, images",
        sizes(CIRR_SIZES, "tiny: seconds, for tests; demo: about a thousand images; full: CIRR's split sizes"),
        lambda out, a: make_synthetic_cirr(out, a.size, a.seed, a.workers),
        lambda c: ", ".join(f"{split}: {v['triplets']:,} triplets over {v['images']:,} images"
                            for split, v in c.items())),
    "circo": Generator(
        "Generate a synthetic data set in CIRCO's layout (several ground truths a query).",
        "annotations/, COCO2017_unlabeled/",
        sizes(CIRCO_SIZES, "tiny: seconds, for tests; demo: CIRCO's 220 val queries over 3,000 images; full: "
                           "CIRCO's query counts"),
        lambda out, a: make_synthetic_circo(out, a.size, a.seed, a.workers),
        lambda c: f"{c['images']:,} images, {c['val']} val and {c['test']} test queries "
                  f"({c['ground_truths_per_val_query']} ground truths a val query)"),
    "identities": Generator(
        "Generate labelled images for learning similarity.", "a sub-folder per identity, labels.csv", identity_args,
        lambda out, a: make_synthetic_identities(out, a.identities, a.views, a.seed, a.workers),
        lambda c: f"{c['images']:,} images of {c['identities']:,} identities"),
}


def generate_main(kind: str, argv: Sequence[str] | None = None) -> int:
    """Parse a generator's arguments, draw into a temporary folder and commit it at ``--out``."""
    generator = GENERATORS[kind]
    parser = argparse.ArgumentParser(prog=f"clip4cir make-synthetic {kind}",
                                     description=generator.description)
    parser.add_argument("--out", required=True,
                        help=f"folder to write ({generator.layout}); a new one, or one this command made")
    parser.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    parser.add_argument("--workers", type=WORKERS, default=None, help="processes that draw images")
    generator.add_args(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts: dict = {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workers")}
    write_folder(args.out, SYNTHETIC_FORMAT, lambda tmp: counts.update(generator.make(str(tmp), args)),
                 {"kind": kind, **settings}, flag="--out")
    print(f"wrote {generator.summary(counts)} to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``clip4cir make-synthetic KIND --out FOLDER ...``: one of the generators, by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise DataError(f"name what to draw first: clip4cir make-synthetic {{{','.join(GENERATORS)}}} --out FOLDER")
    GENERATORS[argv[0]]  # an unknown kind: one line naming the known ones
    return generate_main(argv[0], argv[1:])
