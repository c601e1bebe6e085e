"""The benchmarks (``clip4cir benchmark [NAME]``, ``python scripts/benchmark.py [NAME]``): argument parsing for each,
which then runs the benchmark of clip4cir.benchmarks and writes its JSON and markdown into ``--out``.

    python scripts/benchmark.py [--quick | --config smoke|quick|full]   the pipeline
    python scripts/benchmark.py index [--config smoke|1m|10m]           index kinds against exact search
    python scripts/benchmark.py labels [--config smoke|full]            metric-learning losses, held-out identities
    python scripts/benchmark.py serving [--config smoke|full]           runtimes × APIs × concurrent clients
    python scripts/benchmark.py store [--config smoke|full]             FAISS files against a Milvus server
    python scripts/benchmark.py zero-shot [--config smoke|full]         no triplets: zero-shot φ, catalog adaptation
    python scripts/benchmark.py reliability [--url URL --pid PID]       good and hostile traffic against a live app
    python scripts/benchmark.py storefront                              the demo's match levels and category changes
    python scripts/benchmark.py clip-retrieval [--config smoke|full]    side by side with clip-retrieval
    python scripts/benchmark.py titles-reranking [--config smoke|full]  titles in queries, and a trained re-ranker
    python scripts/benchmark.py ablation [--config smoke|full]          the training recipes
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from clip4cir.benchmarks import (
    ablation,
    clip_retrieval,
    index,
    labels,
    pipeline,
    reliability,
    serving,
    store,
    storefront,
    titles_reranking,
    zero_shot,
)
from clip4cir.commands.common import WORKERS, run, whole

ANNOTATIONS = Path(__file__).resolve().parents[3] / "shared" / "fashioniq"  # beside the checkout


def benchmark_args(argv: Sequence[str] | None, prog: str, doc: str | None, configs: dict, default: str,
                   writes: str, more: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> argparse.Namespace:
    """The options every benchmark takes (``--config``, ``--out``, an existing folder, and ``--work``, a scratch
    folder), and ``more`` of its own."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(configs), default=default)
    parser.add_argument("--out", default="benchmark", help=f"folder for {writes}")
    parser.add_argument("--work", help="scratch folder (default: a temporary folder)")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    args.out = Path(args.out)
    if args.out.exists() and not args.out.is_dir():
        raise FileNotFoundError(f"--out {args.out} is a file; give a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    return args


def pipeline_main(argv: Sequence[str] | None) -> int:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_const", const="quick", dest="config", help="--config quick")
        parser.add_argument("--annotations", default=str(ANNOTATIONS),
                            help="the real FashionIQ annotation files (for the evaluation step)")
        parser.add_argument("--workers", type=WORKERS, default=min(2, os.cpu_count() or 1))
        parser.add_argument("--no-http", action="store_true", help="skip the HTTP-API latencies")
        parser.add_argument("--steps", default=",".join(pipeline.STEPS))

    args = benchmark_args(argv, "clip4cir benchmark", pipeline.__doc__, pipeline.CONFIGS, "full",
                          "report.json and report.md", more)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(pipeline.STEPS))
    if unknown:
        raise ValueError(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(pipeline.STEPS)}")
    pipeline.run_pipeline(args.config, args.out, Path(args.annotations), args.workers, not args.no_http, steps)
    return 0


# subcommand -> (its module: docstring and CONFIGS, its run function, the default config, what it writes)
BENCHMARKS = {"index": (index, index.run_index, "1m", "index.json, index.md and the plot"),
               "labels": (labels, labels.run_labels, "full", "labels.json and labels.md"),
               "serving": (serving, serving.run_serving, "full", "serving.json and serving.md"),
               "store": (store, store.run_store, "full", "store.json and store.md"),
               "zero-shot": (zero_shot, zero_shot.run_zero_shot, "full", "zero-shot.json and zero-shot.md"),
               "storefront": (storefront, storefront.run_storefront, "full", "storefront.json and storefront.md"),
               "clip-retrieval": (clip_retrieval, clip_retrieval.run_clip_retrieval, "full",
                                  "clip-retrieval.json and clip-retrieval.md"),
               "titles-reranking": (titles_reranking, titles_reranking.run_titles_reranking, "full",
                                    "titles-reranking.json and titles-reranking.md")}


def subcommand_main(name: str, argv: Sequence[str] | None) -> int:
    """``benchmark.py NAME [--config ...]``: that benchmark, run with the options every benchmark takes."""
    module, run_benchmark, default, writes = BENCHMARKS[name]
    args = benchmark_args(argv, f"clip4cir benchmark {name}", module.__doc__, module.CONFIGS, default, writes)
    run_benchmark(args.config, args.out, args.work)
    return 0


def reliability_main(argv: Sequence[str] | None) -> int:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", help="a running app (default: start the demo, python app.py, on a free port)")
        parser.add_argument("--pid", type=whole(1), help="the running app's process id, for its memory (with --url)")

    args = benchmark_args(argv, "benchmark.py reliability", reliability.__doc__, reliability.CONFIGS, "full",
                          "reliability.json and reliability.md", more)
    reliability.run_reliability(args.config, args.out, args.work, args.url, args.pid)
    return 0


def ablation_main(argv: Sequence[str] | None = None) -> int:
    args = benchmark_args(argv, "clip4cir benchmark ablation", ablation.__doc__, ablation.CONFIGS, "full",
                          "ablation.json and ablation.md",
                          lambda parser: parser.add_argument("--workers", type=WORKERS, default=2))
    ablation.run_ablation(args.config, args.out, args.work, args.workers)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``benchmark.py SUBCOMMAND ...`` runs that benchmark; without one, the pipeline."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reliability"]:
        return reliability_main(argv[1:])
    if argv[:1] == ["ablation"]:
        return ablation_main(argv[1:])
    if argv[:1] and argv[0] in BENCHMARKS:
        return subcommand_main(argv[0], argv[1:])
    return pipeline_main(argv)


def console() -> int:
    return run(main)
