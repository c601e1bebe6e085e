"""A FAISS index of catalog image features, with every item's id, path, categories and splits stored beside it.

Saved as a folder artifact (:mod:`clip4cir.artifacts`): ``meta.json`` (kind, metric, knobs, the encoder's
fingerprint and how to rebuild it, the catalog it was built from, the category probe), ``items.jsonl``,
``features.npy`` (the raw, not normalised, features: composed search reuses a gallery item's feature without
re-encoding), ``index.faiss`` and ``manifest.json``, written last, with every file's size and hash: a folder
whose files do not belong together is refused when loaded.

Kinds: ``flat`` (exact), ``ivf`` (``nlist``/``nprobe``) and ``hnsw`` (``M``/``efSearch``). Metrics: ``cosine``
(score = inner product of normalised features) and ``euclidean`` (score = minus the L2 distance between
normalised features; the same ranking). A GPU is used for flat and IVF when faiss sees one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import faiss
import numpy as np

from .artifacts import check_destination, read_json, read_manifest, write_folder
from .errors import CatalogIndexError

INDEX_FORMAT = "clip4cir.index"
INDEX_VERSION = 2
KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "euclidean")
DEFAULTS = {"nprobe": 32, "M": 32, "ef_construction": 80, "ef_search": 128}


@dataclass(frozen=True)
class Item:
    """A catalog image: its id, file, and the categories and splits it belongs to (FashionIQ lists some ids in
    several categories' and splits' files; a plain image folder has at most one category and no split)."""

    id: str
    path: str
    categories: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        return cls(d["id"], d["path"], tuple(d.get("categories", ())), tuple(d.get("splits", ())))


class ReadWriteLock:
    """Any number of searches at once, or one change (add, remove) alone; a waiting change goes first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = self._writers_waiting = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def default_nlist(n: int) -> int:
    """4·√N inverted lists, but at least 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def use_gpu(kind: str) -> bool:
    """GPU FAISS when present (flat and IVF; faiss has no GPU HNSW)."""
    return kind != "hnsw" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=-1)
    if bad.any():
        raise CatalogIndexError(f"{int(bad.sum()):,} {what} are NaN or infinite; they cannot be indexed or searched")


class CatalogIndex:
    """Nearest-neighbour search over catalog features, with per-item metadata, add/remove and category filters."""

    def __init__(self, dim: int, kind: str = "flat", metric: str = "cosine", nlist: int | None = None,
                 nprobe: int = DEFAULTS["nprobe"], M: int = DEFAULTS["M"], ef_search: int = DEFAULTS["ef_search"],
                 encoder: dict | None = None):
        if kind not in KINDS:
            raise CatalogIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        if metric not in METRICS:
            raise CatalogIndexError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        for name, value in (("nprobe", nprobe), ("M", M), ("ef_search", ef_search), ("nlist", nlist or 1)):
            if value < 1:
                raise CatalogIndexError(f"{name} must be at least 1, got {value}")
        self.dim, self.kind, self.metric = dim, kind, metric
        self.nlist, self.nprobe, self.M, self.ef_search = nlist, nprobe, M, ef_search
        self.encoder = encoder or {}
        self.source: dict = {}  # where the items came from and its fingerprint, e.g. {"fashioniq": root, ...}
        self.items: list[Item | None] = []  # row = faiss id; None once removed
        self.features = np.zeros((0, dim), dtype=np.float32)
        self.row_of: dict[str, int] = {}
        self.deleted: set[int] = set()  # HNSW cannot remove: its removed rows are filtered out
        self.probe: dict | None = None
        self._faiss: faiss.Index | None = None
        self._lock = ReadWriteLock()
        self._gpu_lock = threading.Lock() if use_gpu(kind) else None  # a GPU index serves one query at a time
        self._selectors: dict = {}
        self._category_rows: dict[str, np.ndarray] | None = None  # derived from items; reset when they change

    # ---- contents -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row_of)

    def rows_by_category(self) -> dict[str, np.ndarray]:
        """The rows of each category's items, computed once per change of the contents (queries use it)."""
        if self._category_rows is None:
            rows: dict[str, list[int]] = {}
            for row, item in enumerate(self.items):
                for category in item.categories if item is not None else ():
                    rows.setdefault(category, []).append(row)
            self._category_rows = {c: np.array(r, dtype=np.int64) for c, r in sorted(rows.items())}
        return self._category_rows

    def categories(self) -> list[str]:
        return list(self.rows_by_category())

    def _contents_changed(self) -> None:
        self._selectors.clear()
        self._category_rows = None

    def item(self, item_id: str) -> Item:
        row = self.row_of.get(item_id)
        if row is None:
            raise CatalogIndexError(f"unknown item id {item_id!r} (not in this index)")
        return self.items[row]

    def feature(self, item_id: str) -> np.ndarray:
        """A copy of the stored raw feature of an item (no re-encoding)."""
        with self._lock.reading():
            self.item(item_id)
            return self.features[self.row_of[item_id]].copy()

    def _new_faiss(self, train: np.ndarray) -> faiss.Index:
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlat(self.dim, metric))
        elif self.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, self.M, metric)
            hnsw.hnsw.efConstruction = DEFAULTS["ef_construction"]
            index = faiss.IndexIDMap2(hnsw)
        else:
            self.nlist = self.nlist or default_nlist(len(train))
            quantizer = faiss.IndexFlat(self.dim, metric)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, metric)
            index.own_fields = True
            quantizer.this.disown()
            index.train(train)
        if use_gpu(self.kind):
            index = faiss.index_cpu_to_all_gpus(index)
        return index

    def add(self, items: Sequence[Item], features: np.ndarray) -> None:
        """Add items with their raw features; an id already present is an error (nothing is added then)."""
        with self._lock.writing():
            self._add(items, features)

    def _add(self, items: Sequence[Item], features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(items), self.dim):
            raise CatalogIndexError(f"expected features of shape ({len(items)}, {self.dim}), got {features.shape}")
        check_finite(features, "features")
        seen = set()
        for item in items:
            if item.id in self.row_of or item.id in seen:
                raise CatalogIndexError(f"item id {item.id!r} is already in the index")
            seen.add(item.id)
        if not len(items):
            return
        if self.kind == "ivf" and self._faiss is None and (self.nlist or 0) > len(items):
            raise CatalogIndexError(f"--nlist {self.nlist} is larger than the {len(items):,} items: an IVF index "
                                    f"needs at least one item per list (default: 4·√N)")
        vectors = normalized(features)
        if self._faiss is None:
            self._faiss = self._new_faiss(vectors)
        start = len(self.items)
        self._faiss.add_with_ids(vectors, np.arange(start, start + len(items), dtype=np.int64))
        self.items += list(items)
        self.features = np.concatenate([self.features, features])
        self.row_of.update({item.id: start + i for i, item in enumerate(items)})
        self._contents_changed()

    def remove(self, ids: Iterable[str]) -> int:
        """Remove items by id (an id given twice counts once); returns how many. Unknown ids are an error, and
        then nothing is removed."""
        ids = list(dict.fromkeys(ids))
        with self._lock.writing():
            return self._remove(ids)

    def _remove(self, ids: list[str]) -> int:
        rows = []
        for item_id in ids:
            self.item(item_id)
            rows.append(self.row_of[item_id])
        if self.kind == "hnsw":
            self.deleted.update(rows)
        elif use_gpu(self.kind):  # GPU indexes cannot remove: remove on a CPU copy and move it back
            cpu = faiss.index_gpu_to_cpu(self._faiss)
            cpu.remove_ids(np.array(rows, dtype=np.int64))
            self._faiss = faiss.index_cpu_to_all_gpus(cpu)
        else:
            self._faiss.remove_ids(np.array(rows, dtype=np.int64))
        for item_id, row in zip(ids, rows):
            del self.row_of[item_id]
            self.items[row] = None
        self._contents_changed()
        return len(rows)

    # ---- search ---------------------------------------------------------------------------------------------
    def _selector(self, category: str | None):
        key = category
        if key not in self._selectors:
            parts = []
            if category is not None:
                parts.append(faiss.IDSelectorBatch(self._members(category)))
            if self.deleted:
                parts.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array(sorted(self.deleted), dtype=np.int64))))
            selector = None
            for part in parts:
                selector = part if selector is None else faiss.IDSelectorAnd(selector, part)
            self._selectors[key] = (selector, parts)  # parts kept alive: faiss holds raw pointers
        return self._selectors[key][0]

    def _params(self, selector):
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def search(self, queries: np.ndarray, k: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) per query; rows are -1 past the end of a small catalog or category."""
        with self._lock.reading():
            return self._search(queries, k, category)

    def top_items(self, query: np.ndarray, k: int, category: str | None = None) -> list[tuple[Item, float]]:
        """The top-k items of one query with their scores, looked up in the same snapshot as the search (safe
        while other threads add or remove items)."""
        with self._lock.reading():
            scores, rows = self._search(query[None], k, category)
            return [(self.items[r], float(s)) for s, r in zip(scores[0].tolist(), rows[0].tolist())
                    if r >= 0 and self.items[r] is not None]

    def _search(self, queries: np.ndarray, k: int, category: str | None) -> tuple[np.ndarray, np.ndarray]:
        if self._faiss is None or not len(self):
            raise CatalogIndexError("the index is empty")
        queries = np.atleast_2d(queries)
        check_finite(queries, "query features")
        queries = normalized(queries)
        selector = self._selector(category)
        params = self._params(selector)
        k_eff = min(k, len(self))
        with self._gpu_lock or contextlib.nullcontext():
            distances, rows = self._faiss.search(queries, k_eff, params=params)
        if category is not None and self.kind != "flat":
            distances, rows = self._complete_filtered(queries, k_eff, category, distances, rows)
        scores = distances if self.metric == "cosine" else -np.sqrt(np.maximum(distances, 0))
        return scores, rows

    def _members(self, category: str) -> np.ndarray:
        members = self.rows_by_category().get(category)
        if members is None:
            raise CatalogIndexError(f"unknown category {category!r}; this index has "
                                    f"{', '.join(self.categories()) or 'no categories'}")
        return members

    def _complete_filtered(self, queries, k, category, distances, rows):
        """Approximate indexes may return fewer than k items of a small category: rank those exactly."""
        members = self._members(category)
        want = min(k, len(members))
        if ((rows >= 0).sum(1) >= want).all():
            return distances, rows
        vectors = normalized(self.features[members])
        sims = queries @ vectors.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(sims, order, 1)
        out_rows = np.full((len(queries), k), -1, dtype=np.int64)
        out_rows[:, : order.shape[1]] = members[order]
        out = np.full((len(queries), k), -np.inf if self.metric == "cosine" else np.inf, dtype=np.float32)
        out[:, : order.shape[1]] = top if self.metric == "cosine" else 2 - 2 * top
        return out, out_rows

    # ---- storage --------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"version": INDEX_VERSION, "dim": self.dim, "kind": self.kind, "metric": self.metric,
                "nlist": self.nlist, "nprobe": self.nprobe, "M": self.M, "ef_search": self.ef_search,
                "deleted": sorted(self.deleted), "probe": self.probe, "size": len(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Commit the folder as one unit (see the module docstring); replaces only an index."""
        def write(tmp: Path) -> None:
            (tmp / "meta.json").write_text(json.dumps(self.meta(), indent=1))
            with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
                for item in self.items:
                    f.write(json.dumps(asdict(item) if item is not None else None) + "\n")
            np.save(tmp / "features.npy", self.features)
            index = self._faiss
            if index is not None and use_gpu(self.kind):
                index = faiss.index_gpu_to_cpu(index)
            if index is not None:
                faiss.write_index(index, str(tmp / "index.faiss"))

        with self._lock.reading():
            write_folder(path, INDEX_FORMAT, write, {"encoder": self.encoder, "source": self.source})

    @staticmethod
    def check_destination(path: str | os.PathLike) -> None:
        """Before any work: ArtifactError if saving to ``path`` would replace something that is not an index."""
        check_destination(path, INDEX_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CatalogIndex":
        """Read an index folder, after checking that its files are the ones it was written with."""
        path = Path(path)
        if not path.is_dir():
            raise CatalogIndexError(f"{path} is not an index folder")
        manifest = read_manifest(path, INDEX_FORMAT)
        meta = read_json(path / "meta.json", "index")
        missing = [k for k in ("dim", "kind", "metric", "nlist", "nprobe", "M", "ef_search") if k not in meta]
        if missing:
            raise CatalogIndexError(f"{path / 'meta.json'} has no {', '.join(map(repr, missing))}")
        try:
            index = cls(int(meta["dim"]), meta["kind"], meta["metric"], meta["nlist"], meta["nprobe"], meta["M"],
                        meta["ef_search"], manifest.get("encoder"))
            with open(path / "items.jsonl", encoding="utf-8") as f:
                index.items = [Item.from_dict(d) if d is not None else None for d in map(json.loads, f)]
            index.features = np.load(path / "features.npy")
            if (path / "index.faiss").is_file():
                index._faiss = faiss.read_index(str(path / "index.faiss"))
                if use_gpu(index.kind):
                    index._faiss = faiss.index_cpu_to_all_gpus(index._faiss)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
            raise CatalogIndexError(f"cannot read index {path}: {e}") from e
        if len(index.items) != len(index.features) or index.features.shape[1:] != (index.dim,):
            raise CatalogIndexError(f"{path}: items.jsonl has {len(index.items)} rows and features.npy "
                                    f"{index.features.shape}, for {index.dim}-d features")
        index.row_of = {item.id: row for row, item in enumerate(index.items) if item is not None}
        index.deleted = set(meta.get("deleted", []))
        stored = index._faiss.ntotal if index._faiss is not None else 0
        if stored != len(index.row_of) + len(index.deleted) or (index._faiss and index._faiss.d != index.dim):
            raise CatalogIndexError(f"{path}/index.faiss holds {stored:,} vectors, the metadata {len(index.row_of):,} "
                                    f"items: the files do not belong together")
        index.probe = meta.get("probe")
        index.source = manifest.get("source", {})
        return index
