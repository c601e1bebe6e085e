"""Lets ``python scripts/NAME.py`` run from a fresh clone without installing it: puts the checkout on sys.path."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
