"""The evaluation command (``scripts/evaluate.py``): FashionIQ Recall@10/50, test-split predictions,
the paper's ablation table, and image-search metrics."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import atomic_write_text
from .category_probe import predict_category, train_probe
from .cli import add_model_args, check_output_file, encoder_from_args, run
from .data import CATEGORIES, GalleryDataset, parse_categories
from .device import resolve_device
from .encoder import CLIPEncoder
from .errors import DataError, ModelError
from .evaluation import RECALL_KS, image_retrieval_metrics, query_records, rank_category, summarize, top_k
from .factory import load_model
from .features import extract_image_features, gallery_features
from .fusion import Combine, combine_sum, load_combiner

TABLE_ENCODERS = ("none", "image", "text", "both")
TABLE_COLUMNS = ("shirt", "dress", "toptee", "average")  # the paper's column order


def combining_function(encoder: CLIPEncoder, combiner_path: str | None, mode: str) -> Combine:
    """``sum``, or the Combiner at ``combiner_path``, checked to have been trained on this encoder's features."""
    if mode == "sum":
        return combine_sum
    if not combiner_path:
        raise ModelError("--mode combiner needs --combiner PATH (a stage-two checkpoint)")
    return load_combiner(combiner_path, encoder.device, encoder)[0].combine


def _parse_pairs(text: str | None, flag: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in TABLE_ENCODERS:
            raise ValueError(f"{flag}: expected ENCODER=PATH with ENCODER in {', '.join(TABLE_ENCODERS)}, got {part!r}")
        pairs[key] = value
    return pairs


def markdown_table(rows: list[tuple[str, str, dict]]) -> str:
    """Rows of (encoder fine-tuning, combining function, metrics) in the paper's layout."""
    head = ["Encoder FT", "Combining"] + [f"{c.capitalize()} R@{k}" for c in TABLE_COLUMNS for k in RECALL_KS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for encoder_ft, combining, metrics in rows:
        cells = [f"{metrics[c][f'R@{k}']:.2f}" if c in metrics else "–" for c in TABLE_COLUMNS for k in RECALL_KS]
        lines.append("| " + " | ".join([encoder_ft, combining] + cells) + " |")
    return "\n".join(lines)


def ablation_table(args: argparse.Namespace, categories: list[str]) -> str:
    """Sum / Combiner × encoder fine-tuning none/image/text/both for the checkpoints given; notes what is missing."""
    checkpoints = _parse_pairs(args.table_checkpoints, "--table-checkpoints")
    combiners = _parse_pairs(args.table_combiners, "--table-combiners")
    device = resolve_device(args.device)
    rows, notes = [], []
    for encoder_ft in TABLE_ENCODERS:
        path = checkpoints.get(encoder_ft)
        if encoder_ft != "none" and not path:
            notes.append(f"no stage-one checkpoint for encoder fine-tuning '{encoder_ft}': its rows are left out")
            continue
        if path and not Path(path).is_file():
            notes.append(f"checkpoint {path} for '{encoder_ft}' does not exist: its rows are left out")
            continue
        encoder = load_model(args.model, args.pretrained, path, seed=args.seed, device=device)
        galleries = {c: gallery_features(encoder, args.data, "val", c, args.cache_dir, args.batch_size, args.workers,
                                         not args.quiet) for c in categories}  # once for both rows
        for combining, combiner_path in (("Sum", None), ("Combiner", combiners.get(encoder_ft))):
            if combining == "Combiner" and not (combiner_path and Path(combiner_path).is_file()):
                notes.append(f"no Combiner checkpoint for '{encoder_ft}'" +
                             (f" ({combiner_path} does not exist)" if combiner_path else ""))
                continue
            combine = combining_function(encoder, combiner_path, "combiner" if combiner_path else "sum")
            rankings = [rank_category(encoder, args.data, c, combine, gallery=galleries[c]) for c in categories]
            rows.append((encoder_ft, combining, summarize(rankings)))
    return markdown_table(rows) + "".join(f"\n\nNote: {n}" for n in notes)


def image_task(encoder: CLIPEncoder, args: argparse.Namespace, categories: list[str]) -> dict:
    """Image-to-image metrics over the split's images of the chosen categories, relevance = same category."""
    dataset = GalleryDataset(args.data, args.split, categories, transform=encoder.transform)
    ids, features = extract_image_features(encoder, dataset, args.batch_size, args.workers, not args.quiet)
    labels = torch.tensor([[c in dataset.categories_of[i] for c in categories] for i in ids])
    return {**image_retrieval_metrics(features, labels), "images": len(ids)}


def category_task(encoder: CLIPEncoder, args: argparse.Namespace, categories: list[str]) -> dict:
    """How often ``category="auto"`` is right: the probe trained on train-split images, scored on the split's."""
    features = {}
    for split in ("train", args.split):
        dataset = GalleryDataset(args.data, split, categories, transform=encoder.transform)
        ids, feats = extract_image_features(encoder, dataset, args.batch_size, args.workers, not args.quiet)
        features[split] = (ids, feats.numpy(), dataset.categories_of)
    ids, feats, categories_of = features["train"]
    probe = train_probe(feats, [categories_of[i] for i in ids])
    ids, feats, categories_of = features[args.split]
    predicted = predict_category(probe, feats)
    right = sum(p in categories_of[i] for p, i in zip(predicted, ids))
    return {"accuracy": 100.0 * right / len(ids), "images": len(ids), "train_images": len(features["train"][0])}


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__)
    parser.add_argument("--data", required=True, help="FashionIQ-layout root")
    add_model_args(parser)
    parser.add_argument("--combiner", help="stage-two checkpoint (clip4cir .safetensors or CLIP4Cir combiner.pt)")
    parser.add_argument("--mode", choices=["sum", "combiner"], help="combining function (default: combiner "
                        "when --combiner is given, else sum)")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--task", choices=["composed", "image", "category"], default="composed",
                        help="composed: Recall@K; image: image-search mAP@K/P@K; category: accuracy of category=auto")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--dump", help="write per-query JSON lines here (reference, captions, target, rank, top-10)")
    parser.add_argument("--predictions", help="--split test: write the top-50 gallery ids per query here")
    parser.add_argument("--table", action="store_true", help="print the paper's ablation table (markdown)")
    parser.add_argument("--table-checkpoints", help="image=PATH,text=PATH,both=PATH stage-one checkpoints")
    parser.add_argument("--table-combiners", help="none=PATH,image=PATH,text=PATH,both=PATH stage-two checkpoints")
    parser.add_argument("--cache-dir", help="cache gallery features here (keyed by encoder fingerprint)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        raise DataError(f"--data {args.data} does not exist")
    categories = parse_categories(args.categories)
    if args.split == "test" and args.task == "composed" and not args.table and not args.predictions:
        raise ValueError("--split test has no targets to score: give --predictions FILE for the top-50 lists")
    for flag in ("json", "dump", "predictions"):  # before the long work whose results they will hold
        check_output_file(getattr(args, flag), f"--{flag}")
    start = time.perf_counter()
    if args.table:
        print(ablation_table(args, categories))
        return 0
    encoder = encoder_from_args(args)
    if args.task in ("image", "category"):
        metrics = (image_task if args.task == "image" else category_task)(encoder, args, categories)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if args.json:
            _write_json(args.json, {**metrics, "model": encoder.describe(), "seconds": time.perf_counter() - start})
        return 0
    mode = args.mode or ("combiner" if args.combiner else "sum")
    combine = combining_function(encoder, args.combiner, mode)
    rankings = [rank_category(encoder, args.data, c, combine, args.split, args.cache_dir, args.batch_size,
                              args.workers, not args.quiet) for c in categories]
    if args.dump:
        lines = [json.dumps(record) for ranking in rankings for record in query_records(ranking)]
        atomic_write_text(args.dump, "".join(line + "\n" for line in lines))
    if args.split == "test":
        predictions = {}
        for r in rankings:
            _, top = top_k(r.queries, r.gallery, 50)
            predictions[r.category] = [{"candidate": t.reference, "captions": list(t.captions),
                                        "top50": [r.gallery_ids[j] for j in row]}
                                       for t, row in zip(r.triplets, top.tolist())]
        _write_json(args.predictions, predictions)
        print(f"wrote top-50 predictions for {sum(map(len, predictions.values())):,} queries to {args.predictions}")
        return 0
    metrics = summarize(rankings)
    for name, m in metrics.items():
        print(f"{name:>8}: " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items()))
    if args.json:
        _write_json(args.json, {**metrics, "model": encoder.describe(),
                                "combiner": args.combiner if mode == "combiner" else "sum",
                                "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
