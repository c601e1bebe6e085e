"""Layer 7, the commands: every argparse parser and ``main``; ``scripts/*.py``, ``app.py`` and the console entry
points are thin shells over these."""
