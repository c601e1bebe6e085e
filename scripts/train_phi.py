"""Train φ for zero-shot composed retrieval (no triplets). See --help (clip4cir.commands.train_phi)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.train_phi import console

if __name__ == "__main__":
    raise SystemExit(console())
