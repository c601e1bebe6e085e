"""Shared fixtures: a tiny synthetic FashionIQ catalog and the real annotation files."""
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for a minute
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from clip4cir.data.synthetic import make_synthetic_fashioniq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic FashionIQ-layout catalog (read-only for tests: copy it before changing it)."""
    root = tmp_path_factory.mktemp("fiq_tiny")
    make_synthetic_fashioniq(root, "tiny", seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def real_annotations() -> Path:
    """The official FashionIQ annotation files (no images), beside the checkout in shared/."""
    root = Path(os.environ.get("FASHIONIQ_ANNOTATIONS", REPO.parent / "shared" / "fashioniq"))
    assert (root / "captions").is_dir(), f"FashionIQ annotations not found at {root} (set FASHIONIQ_ANNOTATIONS)"
    return root


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


@pytest.fixture
def outside():
    """A fresh folder outside the working and temp directories, removed after the test."""
    folder = outside_folder("clip4cir-test-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def outside_catalog(tiny_root):
    """The tiny catalog copied outside the working and temp directories (where a user's catalog lives)."""
    folder = outside_folder("clip4cir-catalog-")
    shutil.copytree(tiny_root, folder / "fiq")
    yield folder / "fiq"
    shutil.rmtree(folder, ignore_errors=True)
