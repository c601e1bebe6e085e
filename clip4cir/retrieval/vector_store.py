"""Where a catalog's feature vectors live and how the nearest ones are found.

:class:`VectorStore` is how a FAISS-backed ``CatalogIndex`` keeps its vectors (a vector database is another store
behind the one index interface, clip4cir.retrieval.index_protocol, as Milvus is). The FAISS-backed stores keep
every vector once: normalised, float32, in ``vectors.npy`` (memory-mapped when loaded), which exact search, exact
re-ranking and the reuse of a catalog item's feature all read. Compressed kinds keep FAISS codes beside it
(``index.faiss``) and re-rank their top ``k × k_factor`` candidates exactly from the full-precision vectors.

Kinds: ``flat`` (exact), ``ivf-sq8`` / ``ivf-fp16`` (inverted lists of 8-bit / 16-bit scalar-quantised codes),
``ivf-pq`` (product-quantised codes, ``pq_m`` bytes a vector) and ``hnsw`` (a graph over 8-bit codes). A GPU is
used for flat and IVF searches when faiss sees one (filtered searches stay on the CPU).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import torch

from clip4cir.core.errors import CatalogIndexError
from clip4cir.core.registry import Registry

DEFAULTS = {"nprobe": 32, "M": 32, "ef_construction": 80, "ef_search": 128, "k_factor": 4}
K_FACTORS = (4, 8, 16, 32)  # re-ranking depths calibration tries
ADD_BLOCK = 65_536  # vectors encoded per FAISS call while adding (bounds the memory of normalising)
EXACT_BLOCK = 65_536  # vectors per matrix product in exact search


def gpus() -> int:
    """How many GPUs FAISS can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class IndexKind:
    """A kind of FAISS store: its family (``flat``: exact; ``ivf``: inverted lists, effort = nprobe; ``hnsw``: a
    graph, effort = efSearch), the FAISS codes of an IVF kind (given the dimension and ``pq_m``), and the bytes a
    vector costs in memory while searching (given the dimension, ``pq_m`` and ``M``)."""

    family: str
    codes: Callable[[int, int], str] | None
    code_bytes: Callable[[int, int, int], float]
    train_size: int = 100_000  # vectors the codes are trained on (a sample of a large catalog suffices)


KINDS: Registry[IndexKind] = Registry("--kind")
KINDS.add("flat", IndexKind("flat", None, lambda d, m, links: 4.0 * d))
KINDS.add("ivf-sq8", IndexKind("ivf", lambda d, m: "SQ8", lambda d, m, links: d + 8.0))
KINDS.add("ivf-fp16", IndexKind("ivf", lambda d, m: "SQfp16", lambda d, m, links: 2.0 * d + 8))
KINDS.add("ivf-pq", IndexKind("ivf", lambda d, m: f"PQ{m}x8", lambda d, m, links: m + 8.0, train_size=200_000))
KINDS.add("hnsw", IndexKind("hnsw", None, lambda d, m, links: d + 8.0 * links + 8))


def default_nlist(n: int) -> int:
    """4·√N inverted lists, but at least 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def check_pq_m(pq_m: int, dim: int) -> None:
    """Product quantization splits a vector into ``pq_m`` equal parts: it must divide the dimension."""
    if not 1 <= pq_m <= dim or dim % pq_m:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        raise CatalogIndexError(f"--pq-m {pq_m} must divide the features' dimension {dim} (it could be "
                                f"{', '.join(map(str, divisors[-8:]))}; default {default_pq_m(dim)})")


def default_pq_m(dim: int) -> int:
    """Bytes per vector of PQ codes: about one per 8 dimensions, a divisor of ``dim``."""
    target = max(1, dim // 8)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), m))


def normalized(x: np.ndarray) -> np.ndarray:
    """A float32 copy with rows of unit length (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    faiss.normalize_L2(x)
    return x


def merge_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, row) per query, by descending score and then ascending row; -1 rows pad short lists."""
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=-1)[:, :k]
    out_scores, out_rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    if out_rows.shape[1] < k:
        pad = k - out_rows.shape[1]
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_rows = np.pad(out_rows, ((0, 0), (0, pad)), constant_values=-1)
    out_rows[~np.isfinite(out_scores)] = -1
    return out_scores.astype(np.float32), out_rows


def inner_products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """queries · vectorsᵀ, computed by torch: in torch's thread pool, which the encoder uses too. NumPy's BLAS
    threads keep spinning after a product and slow the next query's encoding (single queries 10× slower)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a memory-mapped, read-only block: torch only reads it
        return (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
                @ torch.from_numpy(vectors).T).numpy()


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products over ``vectors`` (all of them, those ``allowed`` by a boolean mask, or the
    given ``rows``), block by block so a memory-mapped array is streamed, never copied whole."""
    candidates = np.arange(len(vectors)) if rows is None else np.asarray(rows, dtype=np.int64)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), 0), -1, dtype=np.int64)
    for start in range(0, len(candidates), EXACT_BLOCK):
        block = candidates[start:start + EXACT_BLOCK]
        scores = inner_products(queries, vectors[block[0]:block[-1] + 1] if rows is None else vectors[block])
        if allowed is not None:
            scores[:, ~allowed[block]] = -np.inf
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, block_rows = np.take_along_axis(scores, keep, 1), block[keep]
        else:
            block_rows = np.broadcast_to(block, scores.shape)
        best_scores, best_rows = merge_top_k(np.concatenate([best_scores, scores], 1),
                                             np.concatenate([best_rows, block_rows], 1), k)
    return merge_top_k(best_scores, best_rows, k)


class VectorStore(Protocol):
    """The nearest-neighbour interface of an index: rows are positions, in the order vectors were added."""

    kind: str
    dim: int

    def __len__(self) -> int: ...

    def add(self, vectors: np.ndarray) -> None:
        """Append unit-length vectors; their rows follow the existing ones."""

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, effort: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine scores, rows) of unit-length queries among the ``allowed`` rows (a boolean mask, None:
        all); ``effort`` is nprobe or efSearch for approximate kinds. Rows are -1 past the end of a short list."""

    def search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the given rows (a small category, calibration)."""

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored (unit-length, full-precision) vectors of some rows."""

    def settings(self) -> dict:
        """The knobs to store with the index."""

    def save(self, folder: Path, with_vectors: bool = True) -> None: ...


class FaissStore:
    """Vectors once in ``vectors.npy``; for approximate kinds FAISS codes in ``index.faiss`` (see module doc)."""

    def __init__(self, dim: int, kind: str = "flat", nlist: int | None = None, pq_m: int | None = None,
                 M: int = DEFAULTS["M"], nprobe: int = DEFAULTS["nprobe"], ef_search: int = DEFAULTS["ef_search"],
                 k_factor: int = DEFAULTS["k_factor"]):
        if kind not in KINDS:
            raise CatalogIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)} (or auto)")
        self.family = KINDS[kind].family
        for name, value in (("nprobe", nprobe), ("M", M), ("ef_search", ef_search), ("k_factor", k_factor),
                            ("nlist", 1 if nlist is None else nlist)):
            if value < 1:
                raise CatalogIndexError(f"{name} must be at least 1, got {value}")
        if pq_m is not None:
            check_pq_m(pq_m, dim)
        self.dim, self.kind = dim, kind
        self.nlist, self.pq_m, self.M = nlist, pq_m, M
        self.nprobe, self.ef_search, self.k_factor = nprobe, ef_search, k_factor
        self.x = np.zeros((0, dim), dtype=np.float32)  # the vectors, normalised (memory-mapped once loaded)
        self.index: faiss.Index | None = None  # FAISS codes of the approximate kinds
        self._gpu_index: faiss.Index | None = None
        self._fd: int | None = None  # the vectors file, for reading scattered rows
        self._gpu_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.x)

    # ---- building ---------------------------------------------------------------------------------------------
    def _new_index(self, train: np.ndarray) -> faiss.Index:
        metric = faiss.METRIC_INNER_PRODUCT
        if self.family == "hnsw":
            index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit, self.M, metric)
            index.hnsw.efConstruction = DEFAULTS["ef_construction"]
        else:
            self.nlist = self.nlist or default_nlist(len(train))
            if self.nlist > len(train):
                raise CatalogIndexError(f"nlist {self.nlist} is larger than the {len(train):,} vectors: an IVF "
                                        f"index needs at least one vector per list (default: 4·√N)")
            if self.kind == "ivf-pq":
                self.pq_m = self.pq_m or default_pq_m(self.dim)
            codes = KINDS[self.kind].codes(self.dim, self.pq_m)
            quantizer = "_HNSW32" if self.nlist >= 4096 else ""  # coarse assignment by a graph: fast to add
            index = faiss.index_factory(self.dim, f"IVF{self.nlist}{quantizer},{codes}", metric)
        if not index.is_trained:
            index.train(train)
        return index

    def _encode(self, vectors: np.ndarray) -> None:
        """Train the codes on a sample when there are none yet, then add the vectors' codes block by block."""
        if self.family == "flat" or not len(vectors):
            return
        if self.index is None:
            size = KINDS[self.kind].train_size
            sample = vectors if len(vectors) <= size else \
                vectors[np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))]
            self.index = self._new_index(np.ascontiguousarray(sample))
        for start in range(0, len(vectors), ADD_BLOCK):
            self.index.add(np.ascontiguousarray(vectors[start:start + ADD_BLOCK]))
        self._gpu_index = None

    def coded(self) -> int:
        """How many vectors the codes hold (all but those build() held back)."""
        return len(self) if self.index is None else self.index.ntotal

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise CatalogIndexError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        return vectors

    def build(self, vectors: np.ndarray, hold_back: int = 0) -> None:
        """Take the first vectors as they are (a memory-mapped array is kept, not copied) and encode them, but
        the last ``hold_back``: calibration queries them against the rest, then :meth:`encode_held_back`."""
        if len(self):
            raise CatalogIndexError("build() starts a store; use add() to add to one")
        self.x = self._check(vectors)
        self._encode(vectors[:len(vectors) - hold_back])

    def encode_held_back(self) -> None:
        self._encode(self.x[self.coded():])

    def add(self, vectors: np.ndarray) -> None:
        vectors = self._check(np.asarray(vectors, dtype=np.float32))
        self._encode(vectors)
        self.x = np.concatenate([self.x, vectors]) if len(self.x) else np.array(vectors)

    # ---- searching --------------------------------------------------------------------------------------------
    def _params(self, allowed: np.ndarray | None, effort: int | None):
        selector = keep = None
        if allowed is not None:
            keep = np.packbits(allowed[:self.coded()], bitorder="little")
            selector = faiss.IDSelectorBitmap(self.coded(), faiss.swig_ptr(keep))
        if self.family == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=effort or self.ef_search), keep
        nprobe = effort or self.nprobe
        # a graph coarse quantizer must look at least as wide as the lists it is asked for
        quantizer = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, 64)) if (self.nlist or 0) >= 4096 else None
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe, quantizer_params=quantizer), keep

    def _faiss_index(self, filtered: bool) -> faiss.Index:
        """The GPU copy for unfiltered IVF searches when a GPU is there; the CPU index otherwise (also where the
        GPU cannot hold this kind, e.g. a graph coarse quantizer)."""
        if filtered or self.family == "hnsw" or not gpus():
            return self.index
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError:
                self._gpu_index = self.index
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, effort: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.family == "flat" or not len(self):
            if allowed is None and len(queries) > 8:
                return self._knn(queries, k)
            return exact_search(self.x, queries, k, allowed)
        params, _keep = self._params(allowed, effort)  # _keep: the bitmap FAISS reads, alive during the search
        index = self._faiss_index(allowed is not None)
        depth = min(k * self.k_factor, self.coded())
        if index is not self.index:  # on the GPU (no selectors there; filtered searches use the CPU index)
            with self._gpu_lock:  # a GPU index serves one search at a time
                faiss.extract_index_ivf(index).nprobe = effort or self.nprobe
                _, candidates = index.search(queries, depth)
        else:
            # faiss.contrib.torch_utils (which pytorch-metric-learning imports) replaces Index.search with a
            # version that drops params, keeping FAISS's own as search_numpy
            _, candidates = getattr(index, "search_numpy", index.search)(queries, depth, params=params)
        return self._rerank(queries, candidates, k)

    def _knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of many queries at once: FAISS's brute force (on the GPU when there is one)."""
        if gpus():
            with self._gpu_lock:
                scores, rows = faiss.knn_gpu(faiss.StandardGpuResources(), queries, np.ascontiguousarray(self.x), k,
                                             metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores, rows = faiss.knn(queries, np.ascontiguousarray(self.x), k, metric=faiss.METRIC_INNER_PRODUCT)
        return merge_top_k(scores, rows, k)

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Some rows of the vectors. From a file, read with pread: scattered rows cost what they are, where a
        memory map would bring in the pages around each (resident memory growing towards the whole file)."""
        if not isinstance(self.x, np.memmap):
            return np.asarray(self.x[rows], dtype=np.float32)
        if self._fd is None:
            self._fd = os.open(self.x.filename, os.O_RDONLY)
        row_bytes = 4 * self.dim
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for i, row in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(self._fd, row_bytes, self.x.offset + row * row_bytes), dtype=np.float32)
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates from the full-precision vectors; the k best."""
        valid = candidates >= 0
        rows = np.where(valid, candidates, 0)
        unique, inverse = np.unique(rows, return_inverse=True)
        vectors = self._read_rows(unique)[inverse.reshape(rows.shape)]
        scores = np.einsum("qd,qcd->qc", queries, vectors)
        scores[~valid] = -np.inf
        return merge_top_k(scores, np.where(valid, candidates, -1), k)

    def search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(self.x, np.ascontiguousarray(queries, dtype=np.float32), min(k, len(rows)), rows=rows)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._read_rows(unique)[inverse]

    # ---- storage ----------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "nlist": self.nlist, "pq_m": self.pq_m, "M": self.M,
                "nprobe": self.nprobe, "ef_search": self.ef_search, "k_factor": self.k_factor}

    def save(self, folder: Path, with_vectors: bool = True) -> None:
        """Write ``vectors.npy`` (unless it is there already) and the FAISS codes."""
        if with_vectors:
            np.save(folder / "vectors.npy", self.x)
        if self.index is not None:
            faiss.write_index(self.index, str(folder / "index.faiss"))

    @classmethod
    def load(cls, folder: Path, settings: dict) -> FaissStore:
        """Memory-map the vectors and the FAISS codes: loading reads next to nothing, a search what it touches."""
        store = cls(**settings)
        store.x = np.load(folder / "vectors.npy", mmap_mode="r")
        if store.x.ndim != 2 or store.x.shape[1] != store.dim:
            raise CatalogIndexError(f"{folder / 'vectors.npy'} holds {store.x.shape}, not {store.dim}-d vectors")
        if store.family != "flat":
            store.index = faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
            if store.index.ntotal != len(store.x) or store.index.d != store.dim:
                raise CatalogIndexError(f"{folder / 'index.faiss'} holds {store.index.ntotal:,} {store.index.d}-d "
                                        f"codes for {len(store.x):,} vectors: the files do not belong together")
        return store

    def bytes_per_vector(self) -> float:
        """What one vector costs in memory while searching (the codes; full vectors are read on demand)."""
        return KINDS[self.kind].code_bytes(self.dim, self.pq_m or 0, self.M)
