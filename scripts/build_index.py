"""Build a search index: python scripts/build_index.py (--data FIQ_ROOT | --images FOLDER) --model NAME --output INDEX."""
import sys

from clip4cir.build_index import main
from clip4cir.cli import run

if __name__ == "__main__":
    sys.exit(run(main))
