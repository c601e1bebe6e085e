"""Gradio app: composed, image and text search over a catalog (also the Hugging Face Spaces entry point).
See ``python app.py --help`` and clip4cir.commands.app."""
import sys

from clip4cir.commands.app import main

if __name__ == "__main__":
    sys.exit(main())
