"""Assembling a search engine from what the user gives the app: an index, checkpoints, a zero-shot model, a data
folder to index at start, or nothing at all (the offline demo: the synthetic `demo` catalog and the small model
shipped in ``demo/``). Paths may be ``hf://OWNER/REPO/PATH`` (a file or folder in a Hugging Face model repo)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifacts import is_artifact, write_folder
from .build_index import build_index
from .captions import eval_caption
from .catalog import catalog_items, items_fingerprint
from .device import resolve_device
from .errors import ModelError
from .factory import load_model
from .fingerprints import digest
from .fusion import load_combiner
from .images import load_image
from .index import INDEX_FORMAT, INDEX_VERSION, CatalogIndex
from .search import SearchEngine
from .sources import open_source, reopen
from .synthetic import make_synthetic_fashioniq
from .thumbnails import Thumbnails

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_SEED = 0  # scripts/make_demo_model.py trains on the catalog of this seed


@dataclass
class Options:
    """What the app was asked to serve (command-line arguments or their environment variables)."""

    index: str | None = None
    clip_checkpoint: str | None = None
    combiner: str | None = None
    model: str | None = None
    pretrained: str | None = None
    data: str | None = None
    dataset: str = "auto"
    device: str = "auto"
    cache_dir: str | None = None


def cache_root(options: Options) -> Path:
    return Path(options.cache_dir or os.environ.get("CLIP4CIR_CACHE") or Path.home() / ".cache" / "clip4cir")


def resolve_path(spec: str | None, cache: Path) -> str | None:
    """A local path as is; ``hf://OWNER/REPO/PATH`` downloaded from the Hugging Face Hub (file or folder)."""
    if not spec or not spec.startswith("hf://"):
        return spec
    parts = spec[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec!r}: expected hf://OWNER/REPO/PATH")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo, allow_patterns=[path, f"{path}/*"], cache_dir=str(cache / "hub"))
    except Exception as e:
        raise ModelError(f"could not download {spec} from the Hugging Face Hub (offline?): {e}") from e
    local = Path(folder) / path
    if not local.exists():
        raise ModelError(f"{spec}: no such file or folder in {repo}")
    return str(local)


CATALOG_FORMAT = "clip4cir.synthetic-catalog"


def ensure_demo_catalog(cache: Path, progress: Callable[[str], None] = print) -> Path:
    """The synthetic `demo` catalog in the cache, generated (a few seconds) on first use and committed as one
    folder, so an interrupted first start leaves no half catalog."""
    root = cache / f"fiq-demo-seed{DEMO_SEED}"
    if not is_artifact(root, CATALOG_FORMAT):
        progress(f"generating the synthetic demo catalog in {root} ...")
        write_folder(root, CATALOG_FORMAT, lambda tmp: make_synthetic_fashioniq(tmp, "demo", seed=DEMO_SEED),
                     {"size": "demo", "seed": DEMO_SEED})
    return root


def load_engine(options: Options, progress: Callable[[str], None] = print) -> SearchEngine:
    """The engine the options describe; an index built from ``data`` is cached by data path and encoder."""
    cache = cache_root(options)
    device = resolve_device(options.device)
    index_path = resolve_path(options.index, cache)
    clip_checkpoint = resolve_path(options.clip_checkpoint, cache)
    combiner = resolve_path(options.combiner, cache)
    if index_path:
        return SearchEngine.load(index_path, clip_checkpoint, combiner, str(device))
    data = options.data
    if not (data or options.model or clip_checkpoint):  # nothing given: the offline demo
        data = str(ensure_demo_catalog(cache, progress))
        clip_checkpoint = str(DEMO_DIR / "encoder.safetensors")
        combiner = combiner or str(DEMO_DIR / "combiner.safetensors")
    if not data:
        raise ValueError("give --index, or --data (a data set or an image folder) to index at start")
    if not (options.model or clip_checkpoint):
        raise ValueError("give the encoder for --data: --clip-checkpoint PATH or --model NAME [--pretrained TAG]")
    source = open_source(data, options.dataset)
    encoder = load_model(options.model, options.pretrained, clip_checkpoint, device=device)
    combiner_model = load_combiner(combiner, device, encoder)[0] if combiner else None  # before indexing
    splits = [source.protocol.val_split]
    items = catalog_items(source, splits)
    # keyed on what the index is computed from: the catalog's files as they are now, and the encoder
    key = digest(source.record(), splits, items_fingerprint(items), encoder.fingerprint(), INDEX_VERSION)
    cached = cache / "indexes" / key
    if is_artifact(cached, INDEX_FORMAT):
        index = CatalogIndex.load(cached)
    else:
        progress(f"indexing {len(items):,} images of {source.describe()} with {encoder.describe()} ...")
        index, unreadable = build_index(encoder, source, items, cached, record={"splits": splits}, progress=False)
        if unreadable:
            progress(f"skipped {len(unreadable):,} unreadable images")
    return SearchEngine(index, encoder, combiner_model)


def annotated_captions(index: CatalogIndex, per_item: int = 5) -> dict[str, list[tuple[str, str]]]:
    """The data set's own captions for the indexed references, with their targets: one-click suggestions in
    the app (the known target is marked in the results). Empty when the index was not built from triplets."""
    record = index.source.get("data")
    if not record:
        return {}
    try:
        source = reopen(record)
        splits = source.splits()
    except ValueError:  # the data set has moved: no suggestions
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for split in splits:
        try:
            triplets = source.triplets(split)
        except ValueError:  # e.g. CIRR's train captions, not downloaded
            continue
        for t in triplets:
            if t.target is not None and t.reference in index and t.target in index:
                captions = out.setdefault(t.reference, [])
                if len(captions) < per_item and all(c != eval_caption(t.captions) for c, _ in captions):
                    captions.append((eval_caption(t.captions), t.target))
    return out


def thumbnails_for(index: CatalogIndex, cache: Path) -> Thumbnails:
    """Thumbnails of the index's items, cached under the catalog's fingerprint (a changed image gets a new one);
    images that are not files are read through the data set they came from."""
    data_set = functools.cache(lambda: reopen(index.source["data"]))  # opened when an image is not a file

    def open_image(item_id: str):
        path = index.item(item_id).path
        return load_image(path) if os.path.isfile(path) else data_set().load_image(item_id)

    return Thumbnails(cache / "thumbnails" / str(index.source.get("fingerprint", "catalog")), open_image)
