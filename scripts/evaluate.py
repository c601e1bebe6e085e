"""Evaluate: Recall@K, test predictions, the ablation table, other tasks. See --help (clip4cir.commands.evaluate)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.evaluate import console

if __name__ == "__main__":
    raise SystemExit(console())
