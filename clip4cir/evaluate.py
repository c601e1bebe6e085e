"""The evaluation command (``scripts/evaluate.py``): Recall@K under each data set's protocol (FashionIQ,
CIRR, a user's own triplets), test-split predictions for the test servers, the paper's ablation table, and
image-search metrics."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import atomic_write_text, check_output_file, json_file_matches, resolve
from .category_probe import predict_category, train_probe
from .cli import WORKERS, add_model_args, encoder_from_args, run, whole
from .data import GalleryDataset
from .device import resolve_device
from .encoder import CLIPEncoder, Encoder
from .errors import DataError, ModelError
from .evaluation import image_retrieval_metrics, query_records, rankings_of, summarize, test_predictions
from .factory import load_model
from .features import extract_image_features, gallery_features
from .fusion import Combine, combine_sum, load_combiner
from .label_training import label_metrics
from .sources import Source, add_source_args, source_from_args
from .sources.labels import LabelledImages

TABLE_ENCODERS = ("none", "image", "text", "both")
TABLE_COLUMNS = ("shirt", "dress", "toptee", "average")  # the paper's column order (FashionIQ)


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


def table_columns(source: Source) -> list[tuple[str, str]]:
    """(ranking, metric) columns: FashionIQ's in the paper's order, else the average's metrics."""
    if source.protocol.name == "fashioniq":
        return [(c, f"R@{k}") for c in TABLE_COLUMNS if c in source.categories() + ["average"]
                for k in source.protocol.ks]
    return [("average", f"R@{k}") for k in source.protocol.ks] + \
        [("average", f"Rs@{k}") for k in source.protocol.subset_ks] + [("score", "")]


def markdown_table(rows: list[tuple[str, str, dict]], columns: list[tuple[str, str]]) -> str:
    """Rows of (encoder fine-tuning, combining function, metrics) in the paper's layout."""
    head = ["Encoder FT", "Combining"] + [f"{r.capitalize()} {m}".strip() for r, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for encoder_ft, combining, metrics in rows:
        cells = [f"{(metrics[r][m] if m else metrics[r]):.2f}" if r in metrics else "–" for r, m in columns]
        lines.append("| " + " | ".join([encoder_ft, combining] + cells) + " |")
    return "\n".join(lines)


def ablation_table(args: argparse.Namespace, source: Source) -> str:
    """Sum / Combiner × encoder fine-tuning none/image/text/both for the checkpoints given; notes what is missing."""
    checkpoints = _parse_pairs(args.table_checkpoints, "--table-checkpoints")
    combiners = _parse_pairs(args.table_combiners, "--table-combiners")
    device = resolve_device(args.device)
    split = source.protocol.val_split
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
        names = source.categories() if source.protocol.per_category else [None]
        galleries = {c: gallery_features(encoder, source, split, c, args.cache_dir, args.batch_size, args.workers,
                                         not args.quiet) for c in names}  # once for both rows
        for combining, combiner_path in (("Sum", None), ("Combiner", combiners.get(encoder_ft))):
            if combining == "Combiner" and not (combiner_path and Path(combiner_path).is_file()):
                notes.append(f"no Combiner checkpoint for '{encoder_ft}'" +
                             (f" ({combiner_path} does not exist)" if combiner_path else ""))
                continue
            combine = combining_function(encoder, combiner_path, "combiner" if combiner_path else "sum")
            rankings = rankings_of(encoder, source, split, combine, galleries=galleries)
            rows.append((encoder_ft, combining, summarize(rankings, source.protocol)))
    return markdown_table(rows, table_columns(source)) + "".join(f"\n\nNote: {n}" for n in notes)


def image_task(encoder: CLIPEncoder, args: argparse.Namespace, source: Source) -> dict:
    """Image-to-image metrics over the split's images, relevance = sharing a category."""
    categories = source.categories()
    if not categories:
        raise DataError(f"--task image needs categories (relevance is sharing one); {source.describe()} has none")
    dataset = GalleryDataset(source, args.split, transform=encoder.transform)
    ids, features = extract_image_features(encoder, dataset, args.batch_size, args.workers, not args.quiet)
    labels = torch.tensor([[c in dataset.categories_of[i] for c in categories] for i in ids])
    return {**image_retrieval_metrics(features, labels), "images": len(ids)}


def category_task(encoder: CLIPEncoder, args: argparse.Namespace, source: Source) -> dict:
    """How often ``category="auto"`` is right: the probe trained on train-split images, scored on the split's."""
    features = {}
    for split in (source.splits()[0], args.split):
        dataset = GalleryDataset(source, split, transform=encoder.transform)
        ids, feats = extract_image_features(encoder, dataset, args.batch_size, args.workers, not args.quiet)
        features[split] = (ids, feats.numpy(), dataset.categories_of)
    ids, feats, categories_of = features[source.splits()[0]]
    probe = train_probe(feats, [categories_of[i] for i in ids])
    if probe is None:
        raise DataError(f"--task category needs at least two categories; {source.describe()} has "
                        f"{len(source.categories())}")
    ids, feats, categories_of = features[args.split]
    predicted = predict_category(probe, feats)
    right = sum(p in categories_of[i] for p, i in zip(predicted, ids))
    return {"accuracy": 100.0 * right / len(ids), "images": len(ids),
            "train_images": len(features[source.splits()[0]][0])}


def labels_task(encoder: Encoder, args: argparse.Namespace, source: Source) -> dict:
    """Retrieval on held-out labels (Recall@1/2/4/8, MAP@R, R-precision; top-10 attribute agreement where there
    are attributes), for the encoder and, when it was fine-tuned, for the encoder it started from."""
    if not isinstance(source, LabelledImages):
        raise DataError(f"--task labels needs labelled images (--dataset labels); {source.describe()} has none")
    encoders = {"fine-tuned" if args.clip_checkpoint else "encoder": encoder}
    origin = encoder.source
    if args.clip_checkpoint and origin.get("model"):
        encoders = {"zero-shot": load_model(origin["model"], origin.get("pretrained"), seed=origin.get("seed", 0),
                                            device=encoder.device, embed_dim=origin.get("embed_dim")), **encoders}
    out = {}
    for name, model in encoders.items():
        metrics = label_metrics(model, source, args.split, args.batch_size, args.workers, not args.quiet,
                                attributes=True)
        numbers = source.label_numbers(args.split)
        out[name] = {**metrics, "model": model.describe(), "images": len(numbers),
                     "labels": len(set(numbers.values()))}
    return out


WRITTEN_BY = "clip4cir evaluate"  # the mark of a --json file this command wrote (it may replace only those)
PREDICTION_FILES = ("recall_submission.json", "recall_subset_submission.json", "predictions.json")


def _write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def is_metrics_file(path: Path) -> bool:
    return json_file_matches(path, lambda v: isinstance(v, dict) and v.get("written_by") == WRITTEN_BY)


def is_dump_file(path: Path) -> bool:
    """A --dump: JSON lines of query records (reference, captions and the top ids)."""
    return json_file_matches(path, lambda v: isinstance(v, dict) and {"reference", "captions", "top10"} <= set(v),
                             lines=True)


def is_predictions_file(path: Path) -> bool:
    """A test-server file this command writes: CIRR's (version and metric) or the top-50 lists per category."""
    def accept(v) -> bool:
        if not isinstance(v, dict):
            return False
        if "version" in v and "metric" in v:
            return True
        return all(isinstance(q, list) and all(isinstance(r, dict) and "top50" in r for r in q) for q in v.values())
    return json_file_matches(path, accept)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__)
    add_source_args(parser)
    add_model_args(parser)
    parser.add_argument("--combiner", help="stage-two checkpoint (clip4cir .safetensors or CLIP4Cir combiner.pt)")
    parser.add_argument("--mode", choices=["sum", "combiner"], help="combining function (default: combiner "
                        "when --combiner is given, else sum)")
    parser.add_argument("--split", help="default: the data set's validation split (val)")
    parser.add_argument("--task", choices=["composed", "image", "category", "labels"], default="composed",
                        help="composed: Recall@K; image: image-search mAP@K/P@K; category: accuracy of "
                             "category=auto; labels: retrieval on held-out labels (zero-shot and fine-tuned)")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--dump", help="write per-query JSON lines here (reference, captions, target, rank, top-10)")
    parser.add_argument("--predictions", help="a test split: write the test server's files into this folder "
                        "(CIRR: recall_submission.json and recall_subset_submission.json)")
    parser.add_argument("--table", action="store_true", help="print the paper's ablation table (markdown)")
    parser.add_argument("--table-checkpoints", help="image=PATH,text=PATH,both=PATH stage-one checkpoints")
    parser.add_argument("--table-combiners", help="none=PATH,image=PATH,text=PATH,both=PATH stage-two checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --json, --dump and --predictions replace files this tool did not write")
    parser.add_argument("--cache-dir", help="cache gallery features here (keyed by encoder and data fingerprints)")
    parser.add_argument("--batch-size", type=whole(1), default=64)
    parser.add_argument("--workers", type=WORKERS, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    source = source_from_args(args)
    protocol = source.protocol
    args.split = args.split or (protocol.test_split if args.task == "labels" else protocol.val_split)
    source.check_split(args.split)
    testing = args.split == protocol.test_split
    if testing and args.task == "composed" and not args.table and not args.predictions:
        raise ValueError(f"--split {args.split} has no targets to score: give --predictions FOLDER for the test "
                         f"server's files")
    if args.predictions and not testing:
        raise ValueError(f"--predictions writes the test server's files: use it with --split {protocol.test_split}")
    for flag, is_ours in (("json", is_metrics_file), ("dump", is_dump_file)):  # before the long work
        if getattr(args, flag):
            setattr(args, flag, check_output_file(getattr(args, flag), f"--{flag}", is_ours, args.overwrite))
    if args.predictions:
        args.predictions = resolve(args.predictions)
        if args.predictions.exists() and not args.predictions.is_dir():
            raise DataError(f"--predictions {args.predictions} is a file; give a folder")
        for name in PREDICTION_FILES:
            if (args.predictions / name).exists():
                check_output_file(args.predictions / name, "--predictions", is_predictions_file, args.overwrite)
    start = time.perf_counter()
    if args.table:
        print(ablation_table(args, source))
        return 0
    encoder = encoder_from_args(args)
    if args.task == "labels":
        metrics = labels_task(encoder, args, source)
        for name, m in metrics.items():
            print(f"{name:>10}: " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items() if isinstance(v, float)))
        if args.json:
            _write_json(args.json, {"written_by": WRITTEN_BY, **metrics, "data": source.record(), "split": args.split})
        return 0
    if args.task in ("image", "category"):
        metrics = (image_task if args.task == "image" else category_task)(encoder, args, source)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if args.json:
            _write_json(args.json, {"written_by": WRITTEN_BY, **metrics, "model": encoder.describe(),
                                    "seconds": time.perf_counter() - start})
        return 0
    mode = args.mode or ("combiner" if args.combiner else "sum")
    combine = combining_function(encoder, args.combiner, mode)
    rankings = rankings_of(encoder, source, args.split, combine, args.cache_dir, args.batch_size, args.workers,
                           not args.quiet)
    if args.dump:
        lines = [json.dumps(record) for ranking in rankings for record in query_records(ranking)]
        atomic_write_text(args.dump, "".join(line + "\n" for line in lines))
    if testing:
        folder = Path(args.predictions)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in test_predictions(rankings, protocol).items():
            _write_json(folder / name, content)
        print(f"wrote the test predictions of {sum(len(r.triplets) for r in rankings):,} queries to {folder}")
        return 0
    metrics = summarize(rankings, protocol)
    for name, m in metrics.items():
        if isinstance(m, dict):
            print(f"{name:>8}: " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items()))
    print(f"{'score':>8}: {metrics['score']:.2f} (the mean of {', '.join(protocol.score)})")
    if args.json:
        _write_json(args.json, {"written_by": WRITTEN_BY, **metrics, "data": source.record(), "protocol": protocol.name,
                                "model": encoder.describe(), "combiner": args.combiner if mode == "combiner" else "sum",
                                "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
