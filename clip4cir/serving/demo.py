"""The offline demo: the synthetic `demo` catalog, generated into the cache on first start, and the small model
shipped in ``demo/`` (made by ``scripts/make_demo_model.py`` on the catalog of ``DEMO_SEED``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from clip4cir.core.artifacts import is_artifact, write_folder
from clip4cir.data.synthetic import SYNTHETIC_FORMAT, make_synthetic_fashioniq

log = logging.getLogger(__name__)


DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
DEMO_SEED = 0  # scripts/make_demo_model.py trains on the catalog of this seed


def ensure_demo_catalog(cache: Path, progress: Callable[[str], None] = log.info) -> Path:
    """The synthetic `demo` catalog in the cache, generated (a few seconds) on first use and committed as one
    folder, so an interrupted first start leaves no half catalog."""
    root = cache / f"fiq-demo-seed{DEMO_SEED}"
    if not is_artifact(root, SYNTHETIC_FORMAT):
        progress(f"generating the synthetic demo catalog in {root} ...")
        write_folder(root, SYNTHETIC_FORMAT, lambda tmp: make_synthetic_fashioniq(tmp, "demo", seed=DEMO_SEED),
                     {"size": "demo", "seed": DEMO_SEED})
    return root
