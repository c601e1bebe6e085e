"""Make the offline demo's model in demo/. See --help (clip4cir.commands.make_demo_model)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.make_demo_model import console

if __name__ == "__main__":
    raise SystemExit(console())
