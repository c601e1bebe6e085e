"""The benchmarks: ``python scripts/benchmark.py [NAME] ...``, the same as ``clip4cir benchmark [NAME] ...``
(see --help)."""
import _bootstrap  # noqa: F401

from clip4cir.commands.benchmark import console

if __name__ == "__main__":
    raise SystemExit(console())
