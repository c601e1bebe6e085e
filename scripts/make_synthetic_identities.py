"""Generate labelled images for learning similarity. See --help (clip4cir.commands.make_synthetic)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.make_synthetic import console_identities

if __name__ == "__main__":
    raise SystemExit(console_identities())
