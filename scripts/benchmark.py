"""Benchmarks: python scripts/benchmark.py [--quick | --config smoke|quick|full] [--out DIR] (the pipeline:
extraction, training, evaluation, query latency), python scripts/benchmark.py index [--config smoke|1m|10m]
(index kinds against exact search), or python scripts/benchmark.py labels [--config smoke|full] (metric-learning
losses against the zero-shot encoder on held-out identities)."""
import sys

from clip4cir import benchmark, index_benchmark, label_benchmark
from clip4cir.cli import run
from combiner.benchmark import bench_stage_two


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["index"]:
        return index_benchmark.main(argv[1:])
    if argv[:1] == ["labels"]:
        return label_benchmark.main(argv[1:])
    return benchmark.main(argv, stage_two=bench_stage_two)


if __name__ == "__main__":
    sys.exit(run(main))
