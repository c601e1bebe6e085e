"""Learn image similarity from labels (identities, products): python scripts/train_labels.py --help."""
import sys

from clip4cir.cli import run
from clip4cir.label_training import main

if __name__ == "__main__":
    sys.exit(run(main))
