"""Stage two: train the Combiner on cached features of frozen encoders. See python scripts/train_combiner.py --help."""
import sys

from clip4cir.cli import run
from combiner.train import main

if __name__ == "__main__":
    sys.exit(run(main))
