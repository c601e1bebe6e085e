"""One command for every tool: ``clip4cir SUBCOMMAND [options]`` (``python -m clip4cir`` from a checkout, the
same). ``clip4cir SUBCOMMAND --help`` shows a tool's options; ``clip4cir`` alone lists them."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from clip4cir import __version__
from clip4cir.commands.common import run
from clip4cir.core.registry import Registry


@dataclass(frozen=True)
class Subcommand:
    """A tool: the command module whose ``main(argv)`` runs it (imported only when it is run), in one line."""

    module: str
    summary: str


SUBCOMMANDS: Registry[Subcommand] = Registry("subcommand")
for name, module, summary in [
    ("train", "train_clip", "stage one: fine-tune the CLIP encoders on triplets"),
    ("train-combiner", "train_combiner", "stage two: train the Combiner on frozen features"),
    ("train-reranker", "train_reranker", "re-rank the first candidates: train a re-ranker on frozen features"),
    ("train-phi", "train_phi", "zero-shot: train φ (the picture as a word) on images alone"),
    ("train-pairs", "train_pairs", "adapt CLIP to a catalog's image-text pairs (no triplets)"),
    ("train-labels", "train_labels", "learn image similarity from labels (identities, products)"),
    ("mine-triplets", "mine_triplets", "mine triplets from a catalog's titles"),
    ("import-phi", "import_phi", "import a published φ (Pic2Word) checkpoint"),
    ("index", "build_index", "encode a catalog and build its search index (FAISS files or Milvus)"),
    ("search", "search", "search an index from the command line"),
    ("evaluate", "evaluate", "Recall@K (CIRCO: mAP@K) under FashionIQ's, CIRR's, CIRCO's or a catalog's protocol"),
    ("serve", "app", "the Gradio app and the JSON API (python app.py is the same)"),
    ("benchmark", "benchmark", "the benchmarks (pipeline, index, serving, store, ablation, ...)"),
    ("make-synthetic", "make_synthetic", "a synthetic data set in a real layout (fashioniq, cirr, circo, identities)"),
    ("make-base-model", "make_base_model", "make the demo's pretrained base (image-text pretraining)"),
    ("make-demo-model", "make_demo_model", "make the offline demo's model, index and φ"),
]:
    SUBCOMMANDS.add(name, Subcommand(f"clip4cir.commands.{module}", summary))


def usage() -> str:
    width = max(map(len, SUBCOMMANDS.names()))
    lines = [f"usage: clip4cir SUBCOMMAND [options]   (clip4cir {__version__}; SUBCOMMAND --help for its options)",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {SUBCOMMANDS[name].summary}" for name in SUBCOMMANDS.names()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named first in ``argv`` with the rest of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"clip4cir {__version__}")
        return 0
    subcommand = SUBCOMMANDS[argv[0]]  # an unknown name: one line listing the known ones
    return importlib.import_module(subcommand.module).main(argv[1:])


def console() -> int:
    return run(main)
