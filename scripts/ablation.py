"""The recipe ablation: python scripts/ablation.py [--config smoke|full] [--out benchmark]. See --help."""
import sys

from clip4cir.cli import run
from combiner.ablation import main

if __name__ == "__main__":
    sys.exit(run(main))
