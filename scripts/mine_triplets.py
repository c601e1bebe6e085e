"""Mine triplets from a catalog's titles. See --help (clip4cir.commands.mine_triplets)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.mine_triplets import console

if __name__ == "__main__":
    raise SystemExit(console())
