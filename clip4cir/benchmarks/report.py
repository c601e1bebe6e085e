"""What every benchmark ends with: its report written as JSON and as a markdown table (each committed whole),
the table printed, and the machine it ran on."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from clip4cir.core.artifacts import atomic_write_text
from clip4cir.core.errors import Clip4CirError


def write_report(out: Path, stem: str, report: dict, markdown: Callable[[dict], str]) -> str:
    """Write ``out/STEM.json`` and ``out/STEM.md``; returns (and prints) the markdown."""
    text = markdown(report)
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1))
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
    return text


def stem_for(name: str, config: str, full: str) -> str:
    """The files of the documented run (benchmark/README.md) are NAME.*, others NAME-CONFIG.* (a smoke run never
    replaces them)."""
    return name if config == full else f"{name}-{config}"


class BenchmarkError(Clip4CirError):
    """A benchmark cannot run (e.g. the app does not start or answer) or a target is missed."""
