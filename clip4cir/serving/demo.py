"""The offline demo: the small model shipped in ``demo/``, its catalog (the validation split of the synthetic
`demo` catalog, whose training split the model learned from), drawn large enough to look sharp in the app, and
that catalog's index, its image paths relative to it, so a first start neither draws nor encodes anything.
``clip4cir make-demo-model`` makes all of it."""
from __future__ import annotations

from pathlib import Path

from clip4cir.core.artifacts import is_artifact, write_folder
from clip4cir.core.errors import ModelError
from clip4cir.data.sources import open_source
from clip4cir.data.synthetic import SYNTHETIC_FORMAT, make_synthetic_fashioniq
from clip4cir.models.combiner import Combine
from clip4cir.models.encoder import Encoder
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.index import INDEX_FORMAT

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
DEMO_SEED = 0  # the demo model trains on the catalog of this seed
CATALOG_WIDTH = 192  # pixels: the app shows results at up to 280 px (the model reads 64)


def write_demo_catalog(folder: Path, encoder: Encoder, combine: Combine) -> None:
    """Draw the demo's catalog (the validation split) into ``folder/catalog``, committed as one artifact, and
    index it with ``encoder`` into ``folder/index`` (calibrated with ``combine``), image paths relative."""
    write_folder(folder / "catalog", SYNTHETIC_FORMAT, lambda tmp: make_synthetic_fashioniq(
        tmp, "demo", seed=DEMO_SEED, width=CATALOG_WIDTH, splits=("val",)),
        {"size": "demo", "seed": DEMO_SEED, "width": CATALOG_WIDTH, "splits": ["val"]})
    source = open_source(folder / "catalog")
    splits = [source.protocol.val_split]
    build_index(encoder, source, catalog_items(source, splits), folder / "index",
                BuildOptions(progress=False, combine=combine, relative_paths=True), record={"splits": splits})


def demo_index() -> Path:
    """The shipped demo index; an error that says how to make it when it is not there."""
    folder = DEMO_DIR / "index"
    if not is_artifact(folder, INDEX_FORMAT):
        raise ModelError(f"the demo index {folder} is missing: make it with python -m clip4cir make-demo-model "
                         f"(or give --index or --data)")
    return folder
