"""Learn image similarity from labelled images. See --help (clip4cir.commands.train_labels)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.train_labels import console

if __name__ == "__main__":
    raise SystemExit(console())
