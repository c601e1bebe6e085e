"""The benchmarks (pipeline, index, labels). See --help (clip4cir.commands.benchmark)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.benchmark import console

if __name__ == "__main__":
    raise SystemExit(console())
