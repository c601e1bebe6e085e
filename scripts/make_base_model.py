"""Make the pretrained base model from the image-text pretraining corpus. See --help
(clip4cir.commands.make_base_model)."""
import _bootstrap  # noqa: F401
from clip4cir.commands.make_base_model import console

if __name__ == "__main__":
    raise SystemExit(console())
