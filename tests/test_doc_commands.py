"""Every command the README and the docs/ pages show (``python -m clip4cir ...``, ``clip4cir ...``, ``torchrun ...
-m clip4cir ...``, ``python app.py ...``, ``python scripts/benchmark.py ...``) names a subcommand that exists and
options its parser takes, with values it accepts: each is parsed by the real command, which is stopped right after
parsing (before any work). The commands that can run here (the curl and Python examples) run in test_storefront
and test_readme."""
import argparse
import re
import shlex

import pytest
from helpers import REPO, code_blocks

from clip4cir.commands import cli

PREFIXES = {("python", "-m", "clip4cir"): [], ("clip4cir",): [], ("python", "app.py"): ["serve"],
            ("python", "scripts/benchmark.py"): ["benchmark"]}


class Parsed(Exception):
    """Raised instead of running the command once its arguments parsed."""


def inline_commands() -> list[tuple[str, str]]:
    """Commands written inline (``python scripts/benchmark.py index --config 1m`` between backticks) in the README,
    docs/ and benchmark/README.md."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmark" / "README.md"]
    return [(page.relative_to(REPO).as_posix(), span) for page in pages
            for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", page.read_text(encoding="utf-8"))]


def tool_argv(line: str) -> list[str] | None:
    """The ``clip4cir`` argv a line amounts to, or None when it is not one of the project's commands."""
    if not re.match(r"\s*(\w+=\S+\s+)*(python|clip4cir|torchrun)\b", line):
        return None
    tokens = shlex.split(line, comments=True)
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):  # VAR=value before a command
        tokens = tokens[1:]
    if tokens[:1] == ["torchrun"] and "-m" in tokens:  # torchrun's own options, then -m clip4cir
        tokens = ["python"] + tokens[tokens.index("-m"):]
    for prefix, head in PREFIXES.items():
        if tuple(tokens[:len(prefix)]) == prefix:
            argv = head + tokens[len(prefix):]
            return argv if argv and not argv[0].isupper() else None  # not the listing, not `clip4cir SUBCOMMAND`
    return None


def command_lines() -> list[tuple[str, str, list[str]]]:
    """(page, line as written, its argv) for every command in a bash block: whole commands."""
    found = []
    for page, block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = tool_argv(line)
            if argv:
                found.append((page, line.strip(), argv))
    return found


def inline_lines() -> list[tuple[str, str, list[str]]]:
    """The same for commands written inline in the text, often in part (``clip4cir evaluate --task pairs``)."""
    return [(page, span, argv) for page, span in inline_commands() if (argv := tool_argv(span))]


def parser_of(monkeypatch, argv: list[str]) -> argparse.ArgumentParser:
    """The parser a command line reaches (its subcommand's), stopped before it parses."""
    def stop(self, args=None, namespace=None):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    return parsed.value.args[0]


def parse_only(monkeypatch, argv: list[str]) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    return parsed.value.args[0]


def test_the_docs_show_commands_of_every_main_job():
    lines = command_lines() + inline_lines()
    pages = {page for page, _, _ in lines}
    assert {"README.md", "docs/training.md", "docs/data.md", "docs/milvus.md", "docs/app-and-api.md",
            "benchmark/README.md"} <= pages
    assert {argv[0] for _, _, argv in lines} >= {"train", "train-combiner", "evaluate", "index", "search", "serve",
                                                 "train-pairs", "train-phi", "benchmark", "make-synthetic"}


def test_a_wrong_option_or_subcommand_is_caught(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_only(monkeypatch, ["index", "--data", "x", "--output", "y", "--no-such-option"])
    assert "--no-such-option" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown subcommand 'indx'"):
        parse_only(monkeypatch, ["indx", "--data", "x"])
    assert "--data" in parser_of(monkeypatch, ["index"])._option_string_actions


@pytest.mark.parametrize("page, line, argv", command_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_command_in_the_docs_parses(page, line, argv, monkeypatch, capsys):
    try:
        parse_only(monkeypatch, argv)
    except SystemExit:
        pytest.fail(f"{page}: `{line}` does not parse: {capsys.readouterr().err.strip()[-300:]}")


@pytest.mark.parametrize("page, line, argv", inline_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_command_in_the_text_names_a_subcommand_and_its_options(page, line, argv, monkeypatch):
    options = parser_of(monkeypatch, argv)._option_string_actions
    unknown = [token.split("=")[0] for token in argv if token.startswith("--") and token.split("=")[0] not in options]
    assert not unknown, f"{page}: `{line}` names options its subcommand does not take: {unknown}"
