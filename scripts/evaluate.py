"""FashionIQ Recall@10/50 evaluation: python scripts/evaluate.py --data DIR --model NAME [--clip-checkpoint P] [--combiner P]."""
import sys

from clip4cir.cli import run
from clip4cir.evaluate import main

if __name__ == "__main__":
    sys.exit(run(main))
