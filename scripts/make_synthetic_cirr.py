"""Generate a synthetic catalog in CIRR's exact layout. See --help (clip4cir.commands.make_synthetic)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.make_synthetic import console_cirr

if __name__ == "__main__":
    raise SystemExit(console_cirr())
