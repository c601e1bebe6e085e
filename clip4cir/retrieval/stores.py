"""Where an index keeps its items and vectors, by name (``--store``): ``faiss``, files in the index folder (the
default: one machine, memory-mapped), or ``milvus``, a Milvus collection the folder names (any number of
replicas, clip4cir.retrieval.milvus_index). The folder is the artifact either way; :func:`load_index` opens it."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clip4cir.core.artifacts import read_json
from clip4cir.core.registry import Registry
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.milvus_index import MilvusIndex


@dataclass(frozen=True)
class Store:
    """How an index of this store is built (``create(path, items, features, **options)``) and opened."""

    create: Callable
    load: Callable[[Path, dict], Index]


STORES: Registry[Store] = Registry("--store")
STORES.add("faiss", Store(CatalogIndex.create, lambda path, meta: CatalogIndex.load(path)))
STORES.add("milvus", Store(MilvusIndex.create, MilvusIndex.load))


def load_index(path: str | os.PathLike) -> Index:
    """The index in a folder, whichever store holds its vectors."""
    path = Path(path)
    meta_file = path / "meta.json"
    meta = read_json(meta_file, "index") if meta_file.is_file() else {}
    store = meta.get("store")
    return STORES[store.get("name", "faiss") if isinstance(store, dict) else "faiss"].load(path, meta)
