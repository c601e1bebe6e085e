"""Assembling a search engine from what the user gives the app: an index, checkpoints, a zero-shot model, a data
folder to index at start (its index cached by data and encoder), or nothing at all (the offline demo). Paths may
be ``hf://OWNER/REPO/PATH`` (clip4cir.serving.hub)."""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip4cir.core.artifacts import is_artifact
from clip4cir.core.device import resolve_device
from clip4cir.core.fingerprints import digest
from clip4cir.data.images import load_image
from clip4cir.data.sources import SourceOptions, reopen
from clip4cir.models.combiner import load_combiner
from clip4cir.models.factory import load_model
from clip4cir.models.pseudo_tokens import zero_shot_queries
from clip4cir.models.reranker import load_reranker
from clip4cir.models.runtime import Towers, load_towers, resolve_runtime
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items, items_fingerprint
from clip4cir.retrieval.index import INDEX_FORMAT, INDEX_VERSION, CatalogIndex
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.search import SearchEngine, SearchResult
from clip4cir.retrieval.threads import configure_serving_threads
from clip4cir.serving.batching import BatchedTowers
from clip4cir.serving.demo import DEMO_DIR, demo_index
from clip4cir.serving.hub import resolve_path
from clip4cir.serving.thumbnails import Thumbnails

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What the app was asked to serve (command-line arguments or their environment variables): an index, or a
    data set to index at start (``source``) with an encoder; a Combiner; nothing at all for the offline demo."""

    index: str | None = None
    source: SourceOptions | None = None
    model: str | None = None
    pretrained: str | None = None
    clip_checkpoint: str | None = None
    combiner: str | None = None
    phi: str | None = None  # a φ for zero-shot composed queries (clip4cir.models.pseudo_tokens)
    reranker: str | None = None  # re-ranks composed queries' first candidates (clip4cir.models.reranker)
    device: str = "auto"
    runtime: str = "torch"  # clip4cir.models.runtime: torch, onnx, onnx-int8 or auto
    cache_dir: str | None = None


def cache_root(options: Options) -> Path:
    return Path(options.cache_dir or os.environ.get("CLIP4CIR_CACHE") or Path.home() / ".cache" / "clip4cir")


def load_engine(options: Options, progress: Callable[[str], None] = log.info) -> SearchEngine:
    """The engine the options describe; an index built from ``data`` is cached by data path and encoder."""
    cache = cache_root(options)
    device = resolve_device(options.device)
    index_path = resolve_path(options.index, cache)
    clip_checkpoint = resolve_path(options.clip_checkpoint, cache)
    combiner = resolve_path(options.combiner, cache)
    phi = resolve_path(options.phi, cache)
    reranker = resolve_path(options.reranker, cache)
    if index_path:
        return SearchEngine.load(index_path, clip_checkpoint, combiner, str(device), phi, reranker)
    source_options = options.source
    if not (source_options or options.model or clip_checkpoint):  # nothing given: the offline demo, shipped
        return SearchEngine.load(demo_index(), str(DEMO_DIR / "encoder.safetensors"),
                                 combiner or str(DEMO_DIR / "combiner.safetensors"), str(device),
                                 phi or str(DEMO_DIR / "phi.safetensors"), reranker)
    if not source_options:
        raise ValueError("give --index, or --data (a data set or an image folder) to index at start")
    if not (options.model or clip_checkpoint):
        raise ValueError("give the encoder for --data: --clip-checkpoint PATH or --model NAME [--pretrained TAG]")
    source = source_options.open()
    encoder = load_model(options.model, options.pretrained, clip_checkpoint, device=device)
    combiner_model = load_combiner(combiner, device, encoder)[0] if combiner else None  # before indexing
    phi_queries = zero_shot_queries(phi, encoder) if phi else None
    reranker_model = load_reranker(reranker, device, encoder) if reranker else None
    splits = [source.protocol.val_split]
    items = catalog_items(source, splits)
    # keyed on what the index is computed from: the catalog's files as they are now, and the encoder
    key = digest(source.record(), splits, items_fingerprint(items), encoder.fingerprint(), INDEX_VERSION)
    cached = cache / "indexes" / key
    if is_artifact(cached, INDEX_FORMAT):
        index = CatalogIndex.load(cached)
    else:
        progress(f"indexing {len(items):,} images of {source.describe()} with {encoder.describe()} ...")
        index, unreadable = build_index(encoder, source, items, cached, BuildOptions(progress=False),
                                        record={"splits": splits})
        if unreadable:
            progress(f"skipped {len(unreadable):,} unreadable images")
    return SearchEngine(index, encoder, combiner_model, phi=phi_queries, reranker=reranker_model)


def serving_engine(options: Options, progress: Callable[[str], None] = log.info) -> SearchEngine:
    """The engine of :func:`load_engine` with the towers of ``options.runtime``, queries batched."""
    engine = load_engine(options, progress)
    towers, note = choose_towers(engine, options.runtime, cache_root(options))
    engine.towers, engine.runtime_note = BatchedTowers(towers), note
    progress(f"queries are encoded with {note}")
    return engine


MIN_AGREEMENT = 0.95  # int8 towers must give 95% of fp32's top-10 lists on the catalog's own queries


def choose_towers(engine: SearchEngine, runtime: str, cache: Path) -> tuple[Towers, str]:
    """The towers the engine serves with, and what was chosen and why: the runtime asked for (``auto``: ONNX
    Runtime on a CPU), int8 only when its top-10 lists agree with fp32's on the catalog's queries, else fp32."""
    resolved = resolve_runtime(runtime, engine.encoder.device)
    threads = configure_serving_threads()["torch"]
    if resolved == "torch":
        return Towers(engine.encoder), "torch (eager)"
    fp32 = load_towers(engine.encoder, "onnx", cache, threads)
    if resolved == "onnx":
        return fp32, fp32.describe()
    int8 = load_towers(engine.encoder, "onnx-int8", cache, threads)
    engine.towers = fp32
    agreement = top10_agreement(engine, int8)
    worst = min(agreement.values()) if agreement else 0.0
    shown = ", ".join(f"{kind} {share:.3f}" for kind, share in agreement.items())
    if worst < MIN_AGREEMENT:
        log.warning("int8 towers refused: their top-10 lists share %s with fp32's (below %s); serving fp32", shown,
                    MIN_AGREEMENT)
        return fp32, f"{fp32.describe()} (int8 refused: top-10 agreement {shown} < {MIN_AGREEMENT})"
    return int8, f"{int8.describe()}, top-10 agreement with fp32 {shown}"


def thumbnails_for(index: Index, cache: Path) -> Thumbnails:
    """Thumbnails of the index's items, cached under the catalog's fingerprint (a changed image gets a new one);
    images that are not files are read through the data set they came from."""
    data_set = functools.cache(lambda: reopen(index.source["data"]))  # opened when an image is not a file

    def open_image(item_id: str):
        path = index.item(item_id).path
        return load_image(path) if os.path.isfile(path) else data_set().load_image(item_id)

    return Thumbnails(cache / "thumbnails" / str(index.source.get("fingerprint", "catalog")), open_image)


def top10_agreement(engine: SearchEngine, candidate: Towers, queries: int = 100) -> dict[str, float]:
    """How far another runtime's towers (``candidate``) give the engine's own top-10 lists, on the catalog's own
    queries: its captions as text queries and, with their references, as composed queries, and its items' images
    as image queries. The mean share of each query's top 10 in common, per kind of query; the engine serving is
    not touched (the candidate searches through :meth:`SearchEngine.with_towers`)."""
    index, other = engine.index, engine.with_towers(candidate)
    pairs = [(reference, caption) for reference, entries in sorted(index.captions.items())
             for caption, _ in entries[:1]][:queries]
    files = [index.item(i).path for i in index.ids(queries * 4) if os.path.isfile(index.item(i).path)][:queries]
    kinds = {}

    def overlap(run: list[Callable[[SearchEngine], SearchResult]]) -> float:
        shares = []
        for query in run:
            expected = {h.id for h in query(engine).hits}
            shares.append(len(expected & {h.id for h in query(other).hits}) / max(len(expected), 1))
        return round(float(np.mean(shares)), 4) if shares else 1.0

    if engine.encoder.has_text and pairs:
        kinds["text"] = overlap([lambda e, c=c: e.text_search(c, k=10) for _, c in pairs])
        kinds["composed"] = overlap([lambda e, r=r, c=c: e.composed_search(c, reference_id=r, k=10, mode="sum")
                                     for r, c in pairs])
    if files:
        images = [load_image(path) for path in files]
        kinds["image"] = overlap([lambda e, im=im: e.image_search(im, k=10) for im in images])
    return kinds
