"""Build a search index of a data set or an image folder. See --help (clip4cir.commands.build_index)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.build_index import console

if __name__ == "__main__":
    raise SystemExit(console())
