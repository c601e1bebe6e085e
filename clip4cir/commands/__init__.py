"""Layer 7, the commands: every argparse parser and ``main``, each a subcommand of ``clip4cir`` (cli);
``python -m clip4cir``, ``app.py`` and ``scripts/benchmark.py`` are thin shells over these."""
