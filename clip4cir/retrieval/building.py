"""Building a catalog index: encode the images of a data set's splits (or any image folder), index them.

Encoding is most of the work. It runs in chunks that are saved as they finish (in a hidden folder beside the
output, removed when the index is committed), so an interrupted build resumes without encoding a finished
chunk again; under ``torchrun`` every process encodes its share of the chunks (one GPU each, across machines
too) and the first assembles the index. Progress is shown with an ETA.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from clip4cir.core.artifacts import atomic_write, owned_folder, remove_owned_folder
from clip4cir.core.distributed import Dist, barrier
from clip4cir.core.errors import ArtifactError, BusyError, Clip4CirError, DataError, StoreError
from clip4cir.core.fingerprints import digest
from clip4cir.data.captions import eval_caption
from clip4cir.data.sources import Source
from clip4cir.models.category_probe import train_probe
from clip4cir.models.combiner import Combine
from clip4cir.models.encoder import Encoder
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import encode_texts
from clip4cir.retrieval.catalog import annotated_captions, encode_items, item_titles, items_fingerprint
from clip4cir.retrieval.index import CatalogIndex, Item
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.stores import STORES
from clip4cir.retrieval.tuning import QUERIES, calibration_half, choose_kind
from clip4cir.retrieval.vector_store import KINDS

log = logging.getLogger(__name__)


CHUNK = 4096  # images per saved chunk of features
PROBE_SAMPLE = 50_000  # the category probe learns from at most this many items


@dataclass(frozen=True)
class BuildOptions:
    """How to index: the kind (``auto`` chooses by size and ``memory_budget`` bytes), the metric, the Recall@10
    the approximate kinds are calibrated to, their knobs (None: defaults), and the encoding's batch, workers,
    chunk (what an interruption can lose, and the unit shared out to GPUs) and progress bar; ``relative_paths``:
    image paths stored relative to the index folder, so the index and the images move together (the demo's);
    the store that holds the vectors and its settings."""

    kind: str = "flat"
    metric: str = "cosine"
    target_recall: float | None = None
    memory_budget: int | None = None
    nlist: int | None = None
    pq_m: int | None = None
    M: int | None = None
    batch_size: int = 64
    workers: int = 0
    chunk: int = CHUNK
    progress: bool = True
    combine: Combine = combine_sum  # how the composed queries the index will serve are made (calibration)
    relative_paths: bool = False
    store: str = "faiss"  # clip4cir.retrieval.stores
    store_options: dict = field(default_factory=dict)  # the store's own (milvus: uri, collection)

    def knobs(self) -> dict:
        return {k: v for k, v in (("nlist", self.nlist), ("pq_m", self.pq_m), ("M", self.M)) if v is not None}


def _chunk_file(work: Path, i: int) -> Path:
    return work / f"chunk-{i:06d}.pt"


def encode_catalog(encoder: Encoder, items: Sequence[Item], source: Source, work: Path, batch_size: int = 64,
                   workers: int = 0, progress: bool = True, ddp: Dist = Dist(), chunk: int = CHUNK
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Raw features of the items, encoded in chunks saved in ``work`` (a chunk already there is not encoded
    again), this process taking every ``world_size``-th chunk. Returns, on the main process once all are done,
    the positions of the readable items and their features (memory-mapped from ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    chunks = range((len(items) + chunk - 1) // chunk)
    mine = [i for i in chunks if i % ddp.world_size == ddp.rank]
    todo = [i for i in mine if not _chunk_file(work, i).is_file()]
    bar = tqdm(total=sum(min(chunk, len(items) - i * chunk) for i in mine), desc="encoding images", unit="img",
               disable=not progress, smoothing=0.1)
    bar.update(bar.total - sum(min(chunk, len(items) - i * chunk) for i in todo))  # resumed: done before
    for i in todo:
        part = items[i * chunk:(i + 1) * chunk]
        kept, features, _ = encode_items(encoder, part, source, batch_size, workers, progress=False, start=i * chunk)
        positions = {item.id: p for p, item in enumerate(part)}
        chunk_data = {"positions": torch.tensor([i * chunk + positions[item.id] for item in kept], dtype=torch.long),
                      "features": torch.from_numpy(features)}
        atomic_write(_chunk_file(work, i), partial(torch.save, chunk_data))
        bar.update(len(part))
    bar.close()
    barrier()
    if not ddp.is_main:
        return np.zeros(0, dtype=np.int64), np.zeros((0, encoder.dim), dtype=np.float32)
    parts = [torch.load(_chunk_file(work, i), weights_only=True) for i in chunks]
    positions = np.concatenate([p["positions"].numpy() for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    features = open_memmap(work / "features.npy", mode="w+", dtype=np.float32, shape=(len(positions), encoder.dim))
    start = 0
    for part in parts:
        features[start:start + len(part["positions"])] = part["features"].numpy()
        start += len(part["positions"])
    features.flush()
    return positions, features


def build_index(encoder: Encoder, source: Source, items: Sequence[Item], output: str | os.PathLike,
                options: BuildOptions = BuildOptions(), record: dict | None = None, ddp: Dist = Dist(),
                message: Callable[[str], None] = log.info) -> tuple[Index | None, list[Item]]:
    """Encode the items and write their index to ``output``; returns the index (None on processes other than the
    main one) and the items whose image could not be read. DataError when none can be read: an empty index is
    never a result, and an index already at ``output`` stays as it was. The chunks are kept in
    ``.NAME.encoding`` beside the output, a folder this tool marks as its own: a folder or link of that name
    that it did not make is refused before any work, never written into or deleted."""
    output = CatalogIndex.check_destination(output)
    root = output.parent / f".{output.name}.encoding"
    work = root / digest(encoder.fingerprint(), items_fingerprint(items))
    if ddp.is_main:
        owned_folder(root, "encoding")
        clear_other_encodings(work)
        owned_folder(work, "encoding")
    barrier()
    try:
        index, unreadable = _build(encoder, source, items, output, work, options, record, ddp, message)
    except Clip4CirError as e:  # refused: nothing to resume (an interruption, or a vector database that failed,
        if ddp.is_main and not isinstance(e, (StoreError, BusyError)):  # keeps the chunks for the next run)
            remove_encoding(work)
        raise
    if ddp.is_main:
        remove_encoding(work)  # the chunks this build made, now in the committed index
    return index, unreadable


ENCODING_FILES = re.compile(r"chunk-\d{6}\.pt|features\.npy|\.chunk-\d{6}\.pt\.tmp-\d+-\w+")


def remove_encoding(work: Path) -> None:
    """Delete a build's chunks and then, when nothing else is left in it, the encoding folder; what is not the
    tool's own stays (a warning says so)."""
    try:
        remove_owned_folder(work, "encoding", ENCODING_FILES.fullmatch)
    except ArtifactError as e:
        log.warning("%s", e)
        return
    try:
        remove_owned_folder(work.parent, "encoding", lambda name: False)
    except ArtifactError:  # it still holds another build's encoding (kept, and said) or a file of the user's
        return


def clear_other_encodings(work: Path) -> None:
    """Remove the encodings an earlier build of this output left for another encoder or catalog: they can never
    be resumed (this build's own, ``work``, is resumed). Only folders the tool marked, holding only its chunk
    files, are removed."""
    for other in work.parent.iterdir():
        if other != work and other.is_dir() and not other.is_symlink():
            try:
                remove_owned_folder(other, "encoding", ENCODING_FILES.fullmatch)
            except ArtifactError as e:
                log.warning("%s", e)


def _build(encoder: Encoder, source: Source, items: Sequence[Item], output: Path, work: Path,
           options: BuildOptions, record: dict | None, ddp: Dist, message: Callable[[str], None]
           ) -> tuple[Index | None, list[Item]]:
    positions, features = encode_catalog(encoder, items, source, work, options.batch_size, options.workers,
                                         options.progress, ddp, options.chunk)
    if not ddp.is_main:
        return None, []
    kept = [items[p] for p in positions]
    readable = set(positions.tolist())
    unreadable = [item for p, item in enumerate(items) if p not in readable]
    if not kept:
        shown = ", ".join(item.path for item in unreadable[:3])
        raise DataError(f"none of the {len(items):,} images could be read (first: {shown}); no index was written")
    kind = choose_kind(len(kept), encoder.dim, options.memory_budget) if options.kind == "auto" else options.kind
    sample = np.sort(np.random.default_rng(0).permutation(len(kept))[:PROBE_SAMPLE])
    probe = train_probe(np.asarray(features[sample]), [kept[i].categories for i in sample])
    queries = serving_queries(encoder, source, kept, features, options.combine) \
        if options.target_recall is not None and KINDS[kind].family != "flat" else {}
    stored = [dataclasses.replace(i, path=os.path.relpath(i.path, output)) for i in kept] if options.relative_paths \
        else kept
    index = STORES[options.store].create(
        output, stored, features, kind=kind, metric=options.metric, encoder=encoder.record(),
        source={"data": source.record(), **(record or {}), "items": len(kept), "fingerprint": items_fingerprint(kept)},
        probe=probe, captions=annotated_captions(source, {item.id for item in kept}),
        titles=item_titles(source, {item.id for item in kept}),
        target_recall=options.target_recall, queries=queries, progress=message if options.progress else None,
        **options.knobs(), **options.store_options)
    del features
    return index, unreadable


STAND_IN_WORDS = ("red", "blue", "green", "black", "white", "yellow", "pink", "grey", "brown", "striped", "floral",
                  "plain", "checked", "dotted", "long", "short", "large", "small", "leather", "cotton")


def calibration_pairs(source: Source, rows: dict[str, int]) -> list[tuple[str, str]]:
    """The (reference, evaluation caption) pairs of the data set whose reference is indexed (``rows``) and that
    fall in the calibration half, sorted; a split whose captions are not there (e.g. CIRR's train) is passed over."""
    pairs = set()
    for split in source.splits():
        try:
            triplets = source.triplets(split)
        except DataError:
            continue
        pairs.update((t.reference, eval_caption(t.captions)) for t in triplets  # as shoppers write them: the app
                     if t.reference in rows and calibration_half(t.reference, eval_caption(t.captions)))  # frames them
    return sorted(pairs)


def stand_in_queries(items: Sequence[Item], rng: np.random.Generator, limit: int
                     ) -> tuple[list[int], list[str], list[str]]:
    """Without captions: composed queries ("is red" on a random catalog item) and text queries ("a red dress")
    from the catalog's category names and common attribute words."""
    names = sorted({c for item in items for c in item.categories}) or ["item"]
    words = [(w, name) for w in STAND_IN_WORDS for name in names]
    words = [words[i] for i in sorted(rng.permutation(len(words))[:limit])]
    references = rng.integers(0, len(items), len(words)).tolist()
    return references, [f"is {w}" for w, _ in words], [f"a {w} {name}" for w, name in words]


def serving_queries(encoder: Encoder, source: Source, items: Sequence[Item], features: np.ndarray,
                    combine: Combine = combine_sum, limit: int = QUERIES) -> dict[str, np.ndarray]:
    """The composed and text queries an index of ``items`` will serve, as unit-length features, for calibration:
    the data set's captions of indexed references (the calibration half of its triplets, at most ``limit``), each
    with its reference as a composed query and alone as a text query; without captions, a stand-in from the
    catalog's category names and common attribute words. None for an encoder without a text tower (image queries
    only)."""
    if not encoder.has_text:
        return {}
    rows = {item.id: i for i, item in enumerate(items)}
    pairs = calibration_pairs(source, rows)
    rng = np.random.default_rng(0)
    if pairs:
        chosen = [pairs[i] for i in sorted(rng.permutation(len(pairs))[:limit])]
        references, captions, texts = [rows[r] for r, _ in chosen], [c for _, c in chosen], [c for _, c in chosen]
    else:
        references, captions, texts = stand_in_queries(items, rng, limit)
    with torch.inference_mode():
        composed = combine(torch.from_numpy(np.asarray(features[references])).to(encoder.device),
                           encode_texts(encoder, captions).to(encoder.device)).float().cpu()
    return {"composed": F.normalize(composed, dim=-1).numpy(),
            "text": F.normalize(encode_texts(encoder, texts), dim=-1).numpy()}


def unreadable_reason(source: Source, item: Item) -> str:
    """Why an item's image could not be read (it is read again to tell)."""
    try:
        source.load_image(item.id)
    except DataError as e:
        return str(e)
    return "it could not be read while encoding"
