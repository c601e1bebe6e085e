"""Adapt CLIP to a catalog's own image-text pairs. See --help (clip4cir.commands.train_pairs)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.train_pairs import console

if __name__ == "__main__":
    raise SystemExit(console())
