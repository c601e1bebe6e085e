"""Use a published φ (SEARLE's) for zero-shot composed retrieval. See --help (clip4cir.commands.import_phi)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.import_phi import console

if __name__ == "__main__":
    raise SystemExit(console())
