"""Stage one: fine-tune the CLIP encoders on FashionIQ triplets. See python scripts/train_clip.py --help."""
import sys

from clip4cir.cli import run
from clip4cir.train import main

if __name__ == "__main__":
    sys.exit(run(main))
