"""Search an index: python scripts/search.py --index INDEX [--image P | --ref-id ID] [--caption TEXT] [--k N] [--json]."""
import sys

from clip4cir.cli import run
from clip4cir.search import main

if __name__ == "__main__":
    sys.exit(run(main))
