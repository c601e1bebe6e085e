"""Stage one: fine-tune the CLIP encoders on triplets. See --help (clip4cir.commands.train_clip)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.train_clip import console

if __name__ == "__main__":
    raise SystemExit(console())
