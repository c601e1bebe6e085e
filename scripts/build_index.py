"""Build a search index from a FashionIQ root (--data) or an image folder (--images). See --help."""
import sys

from clip4cir.build_index import main
from clip4cir.cli import run

if __name__ == "__main__":
    sys.exit(run(main))
