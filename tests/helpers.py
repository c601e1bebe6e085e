"""What several test modules share: the checkout, a user's folders and environment, test vectors, waiting."""
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def outside_folder(prefix: str) -> Path:
    """A new folder outside both the working directory and the temp directory, as a user's home or data folder is
    (Gradio serves only those two and its allowed_paths: a test under /tmp would hide a path bug)."""
    for parent in ("/var/tmp", Path.home()):
        try:
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError:
            continue
        if not (folder.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
                or folder.resolve().is_relative_to(REPO)):
            return folder
        shutil.rmtree(folder)
    raise RuntimeError("no writable folder outside the working and temp directories")


def user_env(home: Path, port: int) -> dict:
    """A new user's environment: HOME somewhere else, no cache or data settings of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP4CIR_")}
    return {**env, "HOME": str(home), "CLIP4CIR_PORT": str(port), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False"}


def mixture(n, d=512, clusters=300, seed=0, spread=1.0):
    """Normalised vectors with cluster structure, like image embeddings (uniform noise has no real neighbours)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def wait_until(check: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def code_blocks(language: str) -> list[tuple[str, str]]:
    """Every ``language`` code block of the README and the docs/ pages, with the file it is in."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [(page.relative_to(REPO).as_posix(), block) for page in pages
            for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


def shared_annotations(name: str, env: str, marker: str) -> Path:
    """The real annotation files of a data set, beside the checkout in shared/NAME (or where ``env`` says); the
    test is skipped, saying where it looked, when ``marker`` is not there."""
    root = Path(os.environ.get(env, REPO.parent / "shared" / name))
    if not (root / marker).exists():
        pytest.skip(f"the {name} annotation files are not at {root} (set {env} to where they are)")
    return root

