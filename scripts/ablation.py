"""The recipe ablation. See --help (clip4cir.commands.benchmark)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.benchmark import console_ablation

if __name__ == "__main__":
    raise SystemExit(console_ablation())
