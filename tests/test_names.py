"""Every dotted name of this project written in the code's docstrings and comments, in the README and in docs/
and benchmark/ resolves to a module or an attribute of it now, so the text cannot go on naming modules that
moved (``clip4cir.artifacts`` after it became ``clip4cir.core.artifacts``). Artifact format names
(``clip4cir.index``, ...) are not modules and are known from the code's ``*_FORMAT`` constants."""
import importlib
import pkgutil
import re

import pytest
from helpers import REPO

import clip4cir

NAME = re.compile(r"(?<![\w/.-])(clip4cir(?:\.[A-Za-z_]\w*)+)(?![\w-])")


def formats() -> set[str]:
    found = set()
    for module in pkgutil.walk_packages(clip4cir.__path__, "clip4cir."):
        for key, value in vars(importlib.import_module(module.name)).items():
            if key.endswith("FORMAT") and isinstance(value, str):
                found.add(value)
    return found


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def texts() -> list:
    code = [*REPO.glob("clip4cir/**/*.py"), *REPO.glob("combiner/**/*.py"), REPO / "app.py", *REPO.glob("scripts/*.py")]
    return code + [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("benchmark/*.md")]


def test_the_scan_finds_names_and_would_catch_a_stale_one():
    assert resolves("clip4cir.core.artifacts.write_folder") and resolves("clip4cir.retrieval.index_protocol.Index")
    assert not resolves("clip4cir.artifacts") and not resolves("clip4cir.core.artifacts.no_such_function")
    assert NAME.findall("see clip4cir.threads, and clip4cir.index-format or clip4cir.base-model") == \
        ["clip4cir.threads"]


@pytest.mark.parametrize("path", texts(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_dotted_name_resolves(path):
    known = formats()
    stale = sorted({name.rstrip(".") for name in NAME.findall(path.read_text(encoding="utf-8"))
                    if name.rstrip(".") not in known and not resolves(name.rstrip("."))})
    assert not stale, f"{path.relative_to(REPO)} names what does not exist: {', '.join(stale)}"
