"""Stage two: train the Combiner on the frozen encoders' features. See --help (clip4cir.commands.train_combiner)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.train_combiner import console

if __name__ == "__main__":
    raise SystemExit(console())
