"""Shared fixtures: a tiny synthetic FashionIQ catalog and the real annotation files."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for a minute
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from clip4cir.synthetic import make_synthetic_fashioniq  # noqa: E402

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
