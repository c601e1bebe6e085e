"""FashionIQ Recall@10/50 evaluation (and the ablation table, image and category tasks). See --help."""
import sys

from clip4cir.cli import run
from clip4cir.evaluate import main

if __name__ == "__main__":
    sys.exit(run(main))
