"""A catalog index: the items (``item_table``), their vectors (a ``vector_store``), the calibration of the
approximate kinds (``index_tuning``) and the folder they are saved in, bound to the encoder that made them.

Saved as a folder artifact (:mod:`clip4cir.core.artifacts`): ``meta.json`` (the store's kind and knobs, the metric,
the category and split names, the calibration, the category probe), ``vectors.npy`` (every feature once,
normalised) with ``norms.npy`` (their lengths: composed search reuses a catalog item's raw feature),
``index.faiss`` (the codes of approximate kinds), the item columns, and ``manifest.json``, written last, with
every file's size and hash and the encoder and catalog records. Loading memory-maps the arrays.

Metrics: ``cosine`` (score = inner product of normalised features) and ``euclidean`` (score = minus the L2
distance between normalised features; the same ranking).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from clip4cir.core.artifacts import check_destination, read_json, read_manifest, write_folder
from clip4cir.core.errors import CatalogIndexError
from clip4cir.retrieval.item_table import Item, ItemTable
from clip4cir.retrieval.tuning import EXACT_MEMBERS, QUERIES, Calibration, K, calibrate, efforts_for
from clip4cir.retrieval.vector_store import ADD_BLOCK, DEFAULTS, K_FACTORS, KINDS, FaissStore, VectorStore

INDEX_FORMAT = "clip4cir.index"
INDEX_VERSION = 4  # the same for every store; CHANGELOG.md records each bump
METRICS = ("cosine", "euclidean")

__all__ = ["CatalogIndex", "Item", "INDEX_FORMAT", "INDEX_VERSION", "KINDS", "METRICS", "DEFAULTS"]


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


def metric_scores(cosines: np.ndarray, metric: str) -> np.ndarray:
    """Scores in the index's metric from the cosines of unit vectors: themselves, or minus the L2 distance."""
    return -np.sqrt(np.maximum(2 - 2 * cosines, 0)) if metric == "euclidean" else cosines


def finite_norms(features: np.ndarray, what: str) -> np.ndarray:
    """The features' lengths; CatalogIndexError naming how many are NaN or infinite (never indexed or searched)."""
    features = np.asarray(features, dtype=np.float32)
    bad = ~np.isfinite(features).all(axis=-1)
    if bad.any():
        raise CatalogIndexError(f"{int(bad.sum()):,} {what} are NaN or infinite; they cannot be indexed or searched")
    return np.linalg.norm(features, axis=-1).astype(np.float32)


def write_annotations(folder: Path, captions: dict, titles: dict) -> None:
    """The data set's words beside an index: its captions of references (``captions.json``) and the items'
    titles (``titles.json``), so serving never needs the data set's files."""
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "titles.json").write_text(json.dumps(titles))


def read_annotations(path: Path) -> tuple[dict, dict]:
    """The captions and titles beside an index (an older index may have neither: empty)."""
    return tuple(read_json(path / f"{name}.json", f"index {name}") if (path / f"{name}.json").is_file() else {}
                 for name in ("captions", "titles"))


class CatalogIndex:
    """Nearest-neighbour search over catalog features, with per-item metadata, add/remove and category filters;
    safe for concurrent searches while items are added or removed."""

    def __init__(self, dim: int, kind: str = "flat", metric: str = "cosine", nlist: int | None = None,
                 nprobe: int = DEFAULTS["nprobe"], M: int = DEFAULTS["M"], ef_search: int = DEFAULTS["ef_search"],
                 encoder: dict | None = None, pq_m: int | None = None, k_factor: int = DEFAULTS["k_factor"],
                 store: VectorStore | None = None, exact_members: int = EXACT_MEMBERS):
        if metric not in METRICS:
            raise CatalogIndexError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        self.metric = metric
        self.store = store or FaissStore(dim, kind, nlist, pq_m, M, nprobe, ef_search, k_factor)
        self.table = ItemTable()
        self.norms = np.zeros(0, dtype=np.float32)
        self.encoder = encoder or {}
        self.source: dict = {}  # where the items came from and its fingerprint, e.g. {"fashioniq": root, ...}
        self.probe: dict | None = None
        self.tuning: dict = {}  # calibrated effort per filter ("" = none) and what it measured
        self.captions: dict[str, list[list[str]]] = {}  # reference id -> [caption, known target id] pairs
        self.titles: dict[str, str] = {}  # item id -> its title (shown and searched by the app)
        self.exact_members = exact_members  # a category up to this size is searched exactly
        self._lock = ReadWriteLock()
        self._masks: dict = {}

    # ---- what is in it ----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def kind(self) -> str:
        return self.store.kind

    def describe_store(self) -> str:
        return "FAISS, in the index folder (memory-mapped)"

    def __len__(self) -> int:
        return self.table.live()

    def categories(self) -> list[str]:
        return sorted(name for name, rows in self.table.groups["categories"].rows().items()
                      if len(rows) and not self.table.deleted[rows].all())

    def ids(self, limit: int | None = None) -> list[str]:
        """Live item ids in the order they were added (the first ``limit``)."""
        out = []
        for row in range(len(self.table)):
            if not self.table.deleted[row]:
                out.append(self.table.ids[row].decode("utf-8"))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def sample(self, n: int, category: str | None = None, seed: int = 0) -> list[str]:
        """``n`` live item ids drawn at random (of one category), in a seed's order: a page of the catalog to
        browse. The same seed gives the same page."""
        rows = self.members(category) if category else np.flatnonzero(~np.asarray(self.table.deleted))
        picked = np.random.default_rng(seed).permutation(len(rows))[:n]
        return [self.table.ids[r].decode("utf-8") for r in rows[picked]]

    def find_ids(self, prefix: str, limit: int = 24) -> list[str]:
        """Live item ids that start with ``prefix`` (case as typed), in order: a lookup by id."""
        ids, rows = self.table.sorted_ids()
        key = prefix.encode("utf-8")
        start = int(np.searchsorted(ids, np.array(key, dtype=ids.dtype), "left")) if key else 0
        out = []
        for i in range(start, len(ids)):
            value = bytes(ids[i])
            if not value.startswith(key) or len(out) >= limit:
                break
            if not self.table.deleted[rows[i]]:
                out.append(value.decode("utf-8"))
        return out

    def __contains__(self, item_id: str) -> bool:
        return self.table.row(item_id) is not None

    def _row(self, item_id: str) -> int:
        row = self.table.row(item_id)
        if row is None:
            raise CatalogIndexError(f"unknown item id {item_id!r} (not in this index)")
        return row

    def item(self, item_id: str) -> Item:
        return self.table.item(self._row(item_id))

    def item_at(self, row: int) -> Item:
        return self.table.item(row)

    def feature(self, item_id: str) -> np.ndarray:
        """The raw (not normalised) feature of an item, as the encoder gave it (no re-encoding)."""
        with self._lock.reading():
            row = self._row(item_id)
            return self.store.vectors(np.array([row]))[0] * self.norms[row]

    def members(self, category: str) -> np.ndarray:
        """The live rows of a category."""
        rows = self.table.groups["categories"].rows().get(category)
        if rows is None:
            raise CatalogIndexError(f"unknown category {category!r}; this index has "
                                    f"{', '.join(self.categories()) or 'no categories'}")
        return rows[~self.table.deleted[rows]]

    # ---- changing it ------------------------------------------------------------------------------------------
    def add(self, items: Sequence[Item], features: np.ndarray) -> None:
        """Add items with their raw features; an id already present is an error (nothing is added then)."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(items), self.dim):
            raise CatalogIndexError(f"expected features of shape ({len(items)}, {self.dim}), got {features.shape}")
        norms = finite_norms(features, "features")
        with self._lock.writing():
            self.table.add(items)  # checks the ids first
            try:
                self.store.add(features / np.maximum(norms, 1e-12)[:, None])
            except Exception:
                self.table = self._without_last(len(items))
                raise
            self.norms = np.concatenate([self.norms, norms])
            self._masks.clear()

    def _without_last(self, n: int) -> ItemTable:
        """The table as it was before its last ``n`` rows were added (an add that failed half-way)."""
        table = ItemTable()
        keep = len(self.table) - n
        table.add([self.table.item(r) for r in range(keep)])
        table.deleted = np.array(self.table.deleted[:keep])
        return table

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id (an id given twice counts once); returns how many. Unknown ids are an error, and
        then nothing is removed. The rows stay as tombstones that searches skip until the index is rebuilt."""
        ids = list(dict.fromkeys(ids))
        with self._lock.writing():
            rows = [self._row(item_id) for item_id in ids]
            self.table.remove(rows)
            self._masks.clear()
        return len(rows)

    # ---- searching --------------------------------------------------------------------------------------------
    def _allowed(self, category: str | None) -> np.ndarray | None:
        """The boolean mask of rows a search may return (None: all), cached until the contents change."""
        if category not in self._masks:
            if category is None:
                mask = ~np.asarray(self.table.deleted) if self.table.deleted.any() else None
            else:
                mask = np.zeros(len(self.table), dtype=bool)
                mask[self.members(category)] = True
            self._masks[category] = mask
        return self._masks[category]

    def search(self, queries: np.ndarray, k: int, category: str | None = None, effort: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) per query, within a category if given; rows are -1 past the end of a small
        catalog or category. ``effort`` overrides the calibrated nprobe / efSearch."""
        with self._lock.reading():
            return self._search(queries, k, category, effort)

    def _search(self, queries: np.ndarray, k: int, category: str | None, effort: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
        if not len(self):
            raise CatalogIndexError("the index is empty")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        norms = finite_norms(queries, "query features")
        queries = queries / np.maximum(norms, 1e-12)[:, None]
        k = min(k, len(self))
        if category is not None and len(self.members(category)) <= self.exact_members:
            scores, rows = self.store.search_rows(queries, k, self.members(category))
        else:
            effort = effort or self.tuning.get("effort", {}).get(category or "")
            scores, rows = self.store.search(queries, k, self._allowed(category), effort)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return metric_scores(scores, self.metric), rows

    def top_items(self, query: np.ndarray, k: int, category: str | None = None) -> list[tuple[Item, float]]:
        """The top-k items of one query with their scores, looked up in the same snapshot as the search (safe
        while other threads add or remove items)."""
        with self._lock.reading():
            scores, rows = self._search(query[None], k, category, None)
            return [(self.table.item(r), float(s))
                    for s, r in zip(scores[0].tolist(), rows[0].tolist(), strict=True) if r >= 0]

    # ---- storage ----------------------------------------------------------------------------------------------
    def calibration(self, held_out: np.ndarray, queries: dict[str, np.ndarray] | None = None) -> Calibration:
        """What :func:`~clip4cir.retrieval.tuning.calibrate` measures here, while the codes do not hold the
        ``held_out`` rows yet: those rows as image queries and every other kind of ``queries``, searched in the
        catalog's coded rows and in each category larger than ``exact_members``, against exact search of them."""
        store = self.store
        coded = np.zeros(len(store), dtype=bool)
        coded[:store.coded()] = True
        coded &= ~np.asarray(self.table.deleted)
        allowed = {"": coded} | {c: coded & self._allowed(c) for c in self.categories()
                                 if len(self.members(c)) > self.exact_members}

        def approximate(group: str, kind: str, q: np.ndarray, setting: dict) -> np.ndarray:
            store.k_factor = setting["k_factor"]
            return store.search(q, K, allowed[group], setting["effort"])[1]

        return Calibration(
            kinds={"image": store.vectors(held_out), **{k: v for k, v in (queries or {}).items() if len(v)}},
            groups=list(allowed), efforts=efforts_for(store.family, store.nlist or 0), k_factors=K_FACTORS,
            exact=lambda group, kind, q: store.search_rows(q, K, np.flatnonzero(allowed[group]))[1],
            approximate=approximate)

    def meta(self, names: dict) -> dict:
        return {"version": INDEX_VERSION, "metric": self.metric, "store": self.store.settings(), "names": names,
                "exact_members": self.exact_members, "tuning": self.tuning, "probe": self.probe, "size": len(self)}

    def _write(self, folder: Path, vectors: bool = True) -> None:
        self.store.save(folder, with_vectors=vectors)  # create() streamed the vectors and norms there already
        if vectors:
            np.save(folder / "norms.npy", self.norms)
        names = self.table.save(folder)
        write_annotations(folder, self.captions, self.titles)
        (folder / "meta.json").write_text(json.dumps(self.meta(names), indent=1))

    def save(self, path: str | os.PathLike) -> None:
        """Commit the folder as one unit (see the module docstring); replaces only an index."""
        with self._lock.reading():
            write_folder(path, INDEX_FORMAT, self._write, {"encoder": self.encoder, "source": self.source})

    @classmethod
    def create(cls, path: str | os.PathLike, items: Sequence[Item], features: np.ndarray, *, kind: str = "flat",
               metric: str = "cosine", encoder: dict | None = None, source: dict | None = None,
               probe: dict | None = None, captions: dict | None = None, titles: dict | None = None,
               target_recall: float | None = None, queries: dict[str, np.ndarray] | None = None, progress=None,
               **knobs) -> CatalogIndex:
        """Build an index of ``items`` and their raw ``features`` straight into the folder ``path`` (committed as
        one unit), streaming the vectors through a memory-mapped file so that a catalog larger than memory can
        be indexed; the approximate kinds are calibrated to ``target_recall`` (Recall@10 against exact search,
        also within each category) for held-out items as image queries and every kind of ``queries`` (unit-length
        features of the composed and text queries the index will serve; see clip4cir.retrieval.tuning). Returns
        the index, loaded memory-mapped."""
        if len(items) != len(features):
            raise CatalogIndexError(f"{len(items):,} items but {len(features):,} features")
        if not len(items):
            raise CatalogIndexError("no items to index")

        calibrating = target_recall is not None and KINDS[kind].family != "flat"
        held = np.sort(np.random.default_rng(0).choice(len(items), min(QUERIES, len(items) // 10), replace=False)) \
            if calibrating else np.zeros(0, dtype=np.int64)
        # rows: the catalog in its order, the calibration queries last (their codes are added after calibrating)
        order = np.concatenate([np.setdiff1d(np.arange(len(items)), held), held])

        def write(tmp: Path) -> None:
            vectors = open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=features.shape)
            norms = np.empty(len(features), dtype=np.float32)
            for start in range(0, len(order), ADD_BLOCK):
                rows = order[start:start + ADD_BLOCK]
                block = np.asarray(features[rows], dtype=np.float32)
                norms[start:start + len(rows)] = finite_norms(block, "features")
                vectors[start:start + len(rows)] = block / np.maximum(norms[start:start + len(rows)], 1e-12)[:, None]
            vectors.flush()
            np.save(tmp / "norms.npy", norms)
            index = cls(features.shape[1], kind, metric, encoder=encoder, **knobs)  # knobs incl. exact_members
            if progress:
                progress(f"indexing {len(items):,} vectors ({kind})")
            index.store.build(vectors, hold_back=len(held))
            index.table.add([items[i] for i in order])
            index.norms, index.source, index.probe, index.captions = norms, source or {}, probe, captions or {}
            index.titles = titles or {}
            if calibrating and len(held):
                if progress:
                    progress(f"calibrating for Recall@10 ≥ {target_recall} on {len(held)} held-out items and "
                             f"{', '.join(f'{len(v)} {k}' for k, v in (queries or {}).items())} queries")
                index.tuning = calibrate(index.calibration(np.arange(len(order) - len(held), len(order)), queries),
                                         target_recall)
                index.store.k_factor = index.tuning["k_factor"]
                index.store.encode_held_back()
            index._write(tmp, vectors=False)
            del vectors

        write_folder(path, INDEX_FORMAT, write, {"encoder": encoder or {}, "source": source or {}})
        return cls.load(path)

    @staticmethod
    def check_destination(path: str | os.PathLike) -> Path:
        """Before any work: ArtifactError if saving to ``path`` would replace something that is not an index (or
        an index that holds files of the user's); returns the path to write, links resolved."""
        return check_destination(path, INDEX_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CatalogIndex:
        """Read an index folder, after checking that its files are the ones it was written with; the arrays are
        memory-mapped."""
        path = Path(path)
        if not path.is_dir():
            raise CatalogIndexError(f"{path} is not an index folder")
        manifest = read_manifest(path, INDEX_FORMAT)
        meta = read_json(path / "meta.json", "index")
        missing = [k for k in ("metric", "store", "names") if k not in meta]
        if missing:
            raise CatalogIndexError(f"{path / 'meta.json'} has no {', '.join(map(repr, missing))}")
        try:
            store = FaissStore.load(path, meta["store"])
            index = cls(store.dim, store.kind, meta["metric"], encoder=manifest.get("encoder"), store=store,
                        exact_members=meta.get("exact_members", EXACT_MEMBERS))
            index.table = ItemTable.load(path, meta["names"])
            index.table.root = path.resolve()
            index.norms = np.load(path / "norms.npy", mmap_mode="r")
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
            if isinstance(e, CatalogIndexError):
                raise
            raise CatalogIndexError(f"cannot read index {path}: {e}") from e
        if not len(store) == len(index.table) == len(index.norms):
            raise CatalogIndexError(f"{path}: {len(store):,} vectors, {len(index.norms):,} norms and "
                                    f"{len(index.table):,} items: the files do not belong together")
        index.probe, index.tuning = meta.get("probe"), meta.get("tuning", {})
        index.source = manifest.get("source", {})
        index.captions, index.titles = read_annotations(path)
        return index
