"""``python -m clip4cir SUBCOMMAND ...``: the ``clip4cir`` command (clip4cir.commands.cli)."""
from clip4cir.commands.cli import console

if __name__ == "__main__":
    raise SystemExit(console())
