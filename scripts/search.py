"""Search an index: composed, image or text queries. See --help (clip4cir.commands.search)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.search import console

if __name__ == "__main__":
    raise SystemExit(console())
