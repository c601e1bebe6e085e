"""Make the pretrained base model (``clip4cir make-base-model``): draw the image-text pretraining corpus,
train cir-tiny on it from a random init with CLIP's loss (clip4cir.training.pairs), and measure it against the
random init on the held-out pairs of a catalog it never saw. Writes one folder, committed as a unit:
``encoder.safetensors`` (what ``--clip-checkpoint`` takes; in half precision, under the 10 MB a Hugging Face Space
takes without Git LFS, and measured as stored) and ``metrics.json``.

    python -m clip4cir make-base-model --work ~/base-work --out demo/base
    python -m clip4cir make-base-model --work ~/base-work --trained demo/base/encoder.safetensors   # store, measure
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clip4cir.commands.common import POSITIVE, WORKERS, whole
from clip4cir.core.artifacts import is_artifact, write_folder
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import SYNTHETIC_FORMAT, make_pretraining_corpus, make_synthetic_fashioniq
from clip4cir.evaluation.pairs import pair_metrics
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import load_model
from clip4cir.training.pairs import PairsConfig, PairsTask
from clip4cir.training.trainer import train_here

BASE_FORMAT = "clip4cir.base-model"
HELD_OUT_SEED = 7  # the catalog the base is measured on: drawn by neither the corpus nor the demo


def synthetic(folder: Path, make, settings: dict) -> Path:
    """A generated data set in ``folder``, made once (an artifact of its own) and reused."""
    if not is_artifact(folder, SYNTHETIC_FORMAT):
        write_folder(folder, SYNTHETIC_FORMAT, make, settings)
    return folder


def pretrain(work: Path, args: argparse.Namespace) -> Path:
    """Draw the corpus and train cir-tiny on it (resumed when the run is there); its best checkpoint."""
    corpus = synthetic(work / f"corpus-{args.images}", lambda tmp: make_pretraining_corpus(tmp, args.images),
                       {"kind": "pretraining-corpus", "images": args.images})
    config = PairsConfig(source=SourceOptions(str(corpus / "pairs.jsonl")), output=str(work / "run"),
                         model="cir-tiny", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         workers=args.workers, quiet=True, save_best=True, resume=(work / "run").is_dir())
    train_here(PairsTask, config)
    return work / "run" / "best.safetensors"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip4cir make-base-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (the corpus, the run)")
    parser.add_argument("--out", default="demo/base", help="the base model's folder")
    parser.add_argument("--images", type=whole(200), default=30_000, help="photos in the pretraining corpus")
    parser.add_argument("--epochs", type=whole(1), default=20)
    parser.add_argument("--batch-size", type=whole(2), default=128)
    parser.add_argument("--lr", type=POSITIVE, default=1e-3)
    parser.add_argument("--held-out-size", choices=["tiny", "demo"], default="demo",
                        help="the FashionIQ-layout catalog measured on (its val pairs)")
    parser.add_argument("--trained", help="an encoder trained before: stored and measured, not trained again")
    parser.add_argument("--workers", type=WORKERS, default=2)
    args = parser.parse_args(argv)
    work, started = Path(args.work), time.perf_counter()
    trained = Path(args.trained) if args.trained else pretrain(work, args)
    stored = work / "encoder-half.safetensors"
    save_encoder(load_encoder(trained, record_path=False), stored, half=True)
    held_out = synthetic(work / f"heldout-{args.held_out_size}", lambda tmp: make_synthetic_fashioniq(
        tmp, args.held_out_size, seed=HELD_OUT_SEED), {"kind": "fashioniq", "size": args.held_out_size,
                                                      "seed": HELD_OUT_SEED})
    pairs = open_source(held_out / "pairs.jsonl")
    metrics = {name: pair_metrics(encoder, pairs, "val", workers=args.workers, progress=False) for name, encoder in
               (("random init", load_model("cir-tiny", seed=0)), ("base", load_encoder(stored)))}
    ratio = metrics["base"]["text→image R@10"] / max(metrics["random init"]["text→image R@10"], 1e-9)
    given = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python -m clip4cir make-base-model", *given]), "corpus_images": args.images,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "held_out": f"synthetic FashionIQ layout, size {args.held_out_size}, seed {HELD_OUT_SEED}, val pairs",
              "metrics": metrics, "text_to_image_r10_over_random_init": round(ratio, 2),
              "seconds": round(time.perf_counter() - started, 1)}

    def write(tmp: Path) -> None:
        shutil.copyfile(stored, tmp / "encoder.safetensors")
        (tmp / "metrics.json").write_text(json.dumps(report, indent=1))
    write_folder(args.out, BASE_FORMAT, write, {"images": args.images}, flag="--out")
    print(json.dumps({"text→image R@10": {k: round(v["text→image R@10"], 2) for k, v in metrics.items()},
                      "ratio": report["text_to_image_r10_over_random_init"]}, ensure_ascii=False))
    return 0
