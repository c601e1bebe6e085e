"""A FAISS index of catalog image features, with every item's id, path, category and split stored beside it.

Saved as a folder: ``meta.json`` (format, kind, metric, knobs, the encoder's fingerprint and how to rebuild it,
the category probe), ``items.jsonl``, ``features.npy`` (the raw, not normalised, features: composed search
reuses a gallery item's feature without re-encoding) and ``index.faiss``. Saving writes a new folder and
renames it into place.

Kinds: ``flat`` (exact), ``ivf`` (``nlist``/``nprobe``) and ``hnsw`` (``M``/``efSearch``). Metrics: ``cosine``
(score = inner product of normalised features) and ``euclidean`` (score = minus the L2 distance between
normalised features; the same ranking). A GPU is used for flat and IVF when faiss sees one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

INDEX_FORMAT = "clip4cir.index"
INDEX_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "euclidean")
DEFAULTS = {"nprobe": 32, "M": 32, "ef_construction": 80, "ef_search": 128}


class CatalogIndexError(ValueError):
    """A bad index file, id, category or knob; the message names it."""


@dataclass(frozen=True)
class Item:
    """A catalog image: its id, file, category (None when the catalog has none) and split."""

    id: str
    path: str
    category: str | None = None
    split: str | None = None


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
        self.source: dict = {}  # where the items came from, e.g. {"fashioniq": root, "splits": [...]}
        self.items: list[Item | None] = []  # row = faiss id; None once removed
        self.features = np.zeros((0, dim), dtype=np.float32)
        self.row_of: dict[str, int] = {}
        self.deleted: set[int] = set()  # HNSW cannot remove: its removed rows are filtered out
        self.probe: dict | None = None
        self._faiss: faiss.Index | None = None
        self._lock = threading.Lock() if use_gpu(kind) else None  # a GPU index serves one query at a time
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
                if item is not None and item.category is not None:
                    rows.setdefault(item.category, []).append(row)
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
        """The stored raw feature of an item (no re-encoding)."""
        self.item(item_id)
        return self.features[self.row_of[item_id]]

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
        """Add items with their raw features; an id already present is an error."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(items), self.dim):
            raise CatalogIndexError(f"expected features of shape ({len(items)}, {self.dim}), got {features.shape}")
        seen = set()
        for item in items:
            if item.id in self.row_of or item.id in seen:
                raise CatalogIndexError(f"item id {item.id!r} is already in the index")
            seen.add(item.id)
        if not len(items):
            return
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
        """Remove items by id; returns how many. Unknown ids are an error (nothing is removed then)."""
        ids = list(ids)
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
        if self._faiss is None or not len(self):
            raise CatalogIndexError("the index is empty")
        queries = normalized(np.atleast_2d(queries))
        selector = self._selector(category)
        params = self._params(selector)
        k_eff = min(k, len(self))
        if self._lock is not None:
            with self._lock:
                distances, rows = self._faiss.search(queries, k_eff, params=params)
        else:
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
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "dim": self.dim, "kind": self.kind,
                "metric": self.metric, "nlist": self.nlist, "nprobe": self.nprobe, "M": self.M,
                "ef_search": self.ef_search, "encoder": self.encoder, "source": self.source,
                "deleted": sorted(self.deleted),
                "probe": self.probe, "size": len(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the folder atomically: a new folder, then renamed over the old one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
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
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CatalogIndex":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise CatalogIndexError(f"{path} is not an index folder (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise CatalogIndexError(f"malformed {meta_file}: {e}") from e
        if meta.get("format") != INDEX_FORMAT:
            raise CatalogIndexError(f"{meta_file}: not a clip4cir index (format {meta.get('format')!r})")
        index = cls(meta["dim"], meta["kind"], meta["metric"], meta["nlist"], meta["nprobe"], meta["M"],
                    meta["ef_search"], meta["encoder"])
        try:
            with open(path / "items.jsonl", encoding="utf-8") as f:
                index.items = [Item(**d) if d is not None else None for d in map(json.loads, f)]
            index.features = np.load(path / "features.npy")
            if (path / "index.faiss").is_file():
                index._faiss = faiss.read_index(str(path / "index.faiss"))
                if use_gpu(index.kind):
                    index._faiss = faiss.index_cpu_to_all_gpus(index._faiss)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise CatalogIndexError(f"cannot read index {path}: {e}") from e
        if len(index.items) != len(index.features):
            raise CatalogIndexError(f"{path}: items.jsonl has {len(index.items)} rows, "
                                    f"features.npy {len(index.features)}")
        index.row_of = {item.id: row for row, item in enumerate(index.items) if item is not None}
        index.deleted = set(meta.get("deleted", []))
        index.probe = meta.get("probe")
        index.source = meta.get("source", {})
        return index
