"""Benchmarks: python scripts/benchmark.py [--quick | --config smoke|quick|full] [--out DIR]."""
import sys

from clip4cir.benchmark import main
from clip4cir.cli import run
from combiner.benchmark import bench_stage_two

if __name__ == "__main__":
    sys.exit(run(lambda argv: main(argv, stage_two=bench_stage_two)))
