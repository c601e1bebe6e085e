"""Search an index: a reference and a caption, a reference, or a caption. See --help."""
import sys

from clip4cir.cli import run
from clip4cir.search import main

if __name__ == "__main__":
    sys.exit(run(main))
