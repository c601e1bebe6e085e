"""The evaluation command (``clip4cir evaluate``): Recall@K under each data set's protocol
(FashionIQ, CIRR, a user's own triplets), test-split predictions for the test servers, the paper's ablation
table, and the other tasks of clip4cir.evaluation.tasks."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from clip4cir.commands.common import (
    WORKERS,
    add_model_args,
    add_source_args,
    add_title_args,
    encoder_from_args,
    number,
    source_options,
    whole,
)
from clip4cir.core.artifacts import check_distinct_outputs, check_output_file, resolve, write_output_text
from clip4cir.core.device import resolve_device
from clip4cir.core.errors import DataError
from clip4cir.data.sources import EvaluationProtocol, Source
from clip4cir.evaluation.composed import query_records, test_predictions
from clip4cir.evaluation.table import TABLE_ENCODERS, ablation_table
from clip4cir.evaluation.tasks import TASKS, EvalRequest
from clip4cir.models.combiner import Combiner, combining_function, first_stage_template, load_combiner
from clip4cir.models.reranker import Reranker, load_reranker

log = logging.getLogger(__name__)
WRITTEN_BY = "clip4cir evaluate"  # who wrote a --json file (it is replaced only while unchanged)
PREDICTION_FILES = ("recall_submission.json", "recall_subset_submission.json", "circo_test_submission.json",
                    "predictions.json")


def parse_pairs(text: str | None, flag: str) -> dict[str, str]:
    """``image=PATH,both=PATH`` as a dict, the keys checked."""
    pairs = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in TABLE_ENCODERS:
            raise ValueError(f"{flag}: expected ENCODER=PATH with ENCODER in {', '.join(TABLE_ENCODERS)}, got {part!r}")
        pairs[key] = value
    return pairs


def write_json(path: str | os.PathLike, obj) -> None:
    write_output_text(path, json.dumps(obj, indent=1))


COMPOSING = ("composed", "category")  # the tasks that compose queries (and so use --combiner)


def print_metrics(metrics: dict, indent: str = "") -> None:
    for name, m in metrics.items():
        if isinstance(m, dict) and any(isinstance(v, dict) for v in m.values()):
            print(f"{indent}{name}:")
            print_metrics(m, indent + "  ")
        elif isinstance(m, dict):
            print(f"{indent}{name:>10}: " + "  ".join(f"{k} {v:6.2f}" for k, v in m.items() if isinstance(v, float)))
        elif isinstance(m, float):
            print(f"{indent}{name:>10}: {m:.2f}")
        else:
            print(f"{indent}{name:>10}: {m}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip4cir evaluate", description=__doc__)
    add_source_args(parser)
    add_title_args(parser)
    add_model_args(parser)
    parser.add_argument("--combiner", help="stage-two checkpoint (clip4cir .safetensors or CLIP4Cir combiner.pt)")
    parser.add_argument("--phi", help="zero-shot: a φ checkpoint (clip4cir train-phi), composing queries by "
                        "textual inversion")
    parser.add_argument("--reranker", help="re-rank the first candidates (clip4cir train-reranker; Recall@K of a "
                        "split with targets)")
    parser.add_argument("--sum-weight", type=number(0, 100),
                        help="--mode phi: add the Sum query × this to φ's (default: the weight in φ's file; "
                             "0: φ alone)")
    parser.add_argument("--mode", choices=["sum", "combiner", "phi"], help="combining function (default: combiner "
                        "when --combiner is given, phi when --phi is, else sum)")
    parser.add_argument("--split", help="default: the data set's validation split (val)")
    parser.add_argument("--task", choices=TASKS.names(), default="composed",
                        help="composed: Recall@K; image: image-search mAP@K/P@K; category: accuracy of "
                             "category=auto and composed recall within each choice of category; labels: retrieval on "
                             "held-out labels (zero-shot and fine-tuned); pairs: text→image and image→text "
                             "Recall@K on held-out image-text pairs")
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
    return parser.parse_args(argv)


def check_outputs(args: argparse.Namespace, testing: bool, test_split: str) -> None:
    """Before the long work whose results they will hold: each output can be written and replaces nothing of
    the user's."""
    if args.predictions and not testing:
        raise ValueError(f"--predictions writes the test server's files: use it with --split {test_split}")
    inputs = {f"--{flag.replace('_', '-')}": getattr(args, flag) for flag in ("clip_checkpoint", "combiner", "phi",
                                                                             "data", "images")}
    for flag in ("--table-checkpoints", "--table-combiners"):
        pairs = parse_pairs(getattr(args, flag[2:].replace("-", "_")), flag)
        inputs.update({f"{flag} {key}": path for key, path in pairs.items()})
    for flag in ("json", "dump"):
        if getattr(args, flag):
            setattr(args, flag, check_output_file(getattr(args, flag), f"--{flag}", args.overwrite, inputs))
    check_distinct_outputs({"--json": args.json, "--dump": args.dump})
    if args.predictions:
        args.predictions = resolve(args.predictions)
        if args.predictions.exists() and not args.predictions.is_dir():
            raise DataError(f"--predictions {args.predictions} is a file; give a folder")
        for name in PREDICTION_FILES if args.predictions.is_dir() else ():
            check_output_file(args.predictions / name, "--predictions", args.overwrite, inputs)


def checked_split(args: argparse.Namespace, source: Source) -> bool:
    """Fill in ``--split`` (the protocol's test split for labels, else its val split) and check it is one of the
    source's; whether it is the test split, checked to have somewhere to write (it has no targets to score)."""
    protocol = source.protocol
    args.split = args.split or (protocol.test_split if args.task == "labels" else protocol.val_split)
    source.check_split(args.split)
    testing = args.split == protocol.test_split
    if testing and args.task == "composed" and not args.table and not args.predictions:
        raise ValueError(f"--split {args.split} has no targets to score: give --predictions FOLDER for the test "
                         f"server's files")
    if args.reranker and (testing or args.task != "composed" or args.table or args.dump):
        raise ValueError("--reranker re-ranks composed queries of a split with targets (their Recall@K); the test "
                         "server's files, --dump's top-10 lists and --table come from the first stage: leave out "
                         "--reranker for them")
    check_outputs(args, testing, protocol.test_split)
    return testing


def query_mode(args: argparse.Namespace) -> str:
    """How queries are composed: --mode, else the Combiner when given, φ when given, else the Sum."""
    mode = args.mode or ("combiner" if args.combiner else "phi" if args.phi else "sum")
    if args.sum_weight is not None and mode != "phi":
        raise ValueError(f"--sum-weight weighs the Sum in φ's queries: it needs --phi (the mode is {mode})")
    return mode


def write_predictions(folder: Path, rankings, protocol: EvaluationProtocol) -> None:
    """The test server's files of a test split's rankings."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in test_predictions(rankings, protocol).items():
        write_json(folder / name, content)
    print(f"wrote the test predictions of {sum(len(r.triplets) for r in rankings):,} queries to {folder}")


def result_record(args: argparse.Namespace, result, source, encoder, mode: str, request: EvalRequest,
                  seconds: float) -> dict:
    """What ``--json`` writes: the metrics and what they were measured on."""
    composing = args.task in COMPOSING
    return {"written_by": WRITTEN_BY, **result.metrics, "task": args.task, "split": args.split,
            "data": source.record(), "protocol": source.protocol.name, "model": encoder.describe(),
            "combiner": args.combiner if mode == "combiner" and composing else None,
            "phi": args.phi if mode == "phi" and composing else None, "reranker": args.reranker,
            **({"phi_sum_weight": request.combine.sum_weight} if mode == "phi" and composing else {}),
            "seconds": seconds}


def titled_as_trained(args: argparse.Namespace, source: Source, template: str | None) -> Source:
    """The data set read as the model was trained: with the title template its training recorded (unless
    --title-template names one)."""
    if args.title_template is not None or template is None:
        return source
    log.info("title-aware queries, as the model was trained: %r", template)
    try:
        return replace(source_options(args), title_template=template).open()
    except DataError as e:
        raise DataError(f"the model was trained with title template {template!r}, but: {e}") from None


def check_reranker_mode(reranker: Reranker, args: argparse.Namespace, mode: str, combiner: Combiner | None,
                        source: Source) -> None:
    """The re-ranker must have been trained on this way of composing's candidates, with the same Combiner and
    captions read the same way."""
    if mode != reranker.first_stage:
        raise ValueError(f"--reranker {args.reranker} re-ranks {reranker.first_stage} queries, not --mode {mode}")
    reranker.check_first_stage(combiner, source.record().get("title_template"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source = source_options(args).open()
    protocol = source.protocol
    testing = checked_split(args, source)
    start = time.perf_counter()
    request = EvalRequest(args.split, cache_dir=args.cache_dir, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.quiet)
    if args.table:
        print(ablation_table(source, args.model, args.pretrained, args.seed, resolve_device(args.device),
                             parse_pairs(args.table_checkpoints, "--table-checkpoints"),
                             parse_pairs(args.table_combiners, "--table-combiners"), request))
        return 0
    encoder = encoder_from_args(args)
    mode = query_mode(args)
    if args.task in COMPOSING:
        combiner = load_combiner(args.combiner, encoder.device, encoder)[0] if mode == "combiner" and args.combiner \
            else None
        request.combine = combiner.combine if combiner is not None else \
            combining_function(encoder, args.combiner, mode, args.phi, args.sum_weight)
        source = titled_as_trained(args, source, first_stage_template(encoder, combiner, mode))
        request.reranker = load_reranker(args.reranker, encoder.device, encoder) if args.reranker else None
        if request.reranker is not None:
            check_reranker_mode(request.reranker, args, mode, combiner, source)
    result = TASKS[args.task](encoder, source, request)
    if args.dump:
        lines = [json.dumps(record) for ranking in result.rankings for record in query_records(ranking)]
        write_output_text(args.dump, "".join(line + "\n" for line in lines))
    if args.task == "composed" and testing:
        write_predictions(Path(args.predictions), result.rankings, protocol)
        return 0
    print_metrics(result.metrics)
    if args.json:
        write_json(args.json, result_record(args, result, source, encoder, mode, request, time.perf_counter() - start))
    return 0
