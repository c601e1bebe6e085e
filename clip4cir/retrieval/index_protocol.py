"""The one interface of a catalog index, whichever store holds its vectors: what search, the app and the commands
use. :class:`~clip4cir.retrieval.index.CatalogIndex` (FAISS files) and
:class:`~clip4cir.retrieval.milvus_index.MilvusIndex` (a Milvus collection) both satisfy it;
tests/test_index_contract.py runs the same contract tests on each."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from clip4cir.retrieval.item_table import Item


@runtime_checkable
class Index(Protocol):
    """A catalog's items, their features and nearest-neighbour search over them; safe for concurrent searches."""

    metric: str  # "cosine" or "euclidean": how scores are reported
    encoder: dict  # the record of the encoder that made the features (a search must use the same)
    source: dict  # where the items came from, and its fingerprint
    probe: dict | None  # the category probe trained on the features, if any
    tuning: dict  # the calibrated effort per filter ("" = none) and what it measured
    captions: dict[str, list[list[str]]]  # reference id -> [caption, known target id] pairs of the data set
    titles: dict[str, str]  # item id -> its title

    @property
    def dim(self) -> int:
        """The features' dimension."""

    @property
    def kind(self) -> str:
        """The kind of index, as shown to users (e.g. ``flat``, ``milvus HNSW``)."""

    def describe_store(self) -> str:
        """Where the vectors live, in one line."""

    def __len__(self) -> int:
        """How many items are in it now."""

    def __contains__(self, item_id: str) -> bool:
        """Whether an item of this id is in it."""

    def categories(self) -> list[str]:
        """The categories of its items, sorted."""

    def ids(self, limit: int | None = None) -> list[str]:
        """Item ids in the store's order (the first ``limit``)."""

    def sample(self, n: int, category: str | None = None, seed: int = 0) -> list[str]:
        """``n`` distinct item ids (of one category) in a seed's order: a page to browse; the same seed gives the
        same page."""

    def find_ids(self, prefix: str, limit: int = 24) -> list[str]:
        """The first ``limit`` ids, sorted, that start with ``prefix``."""

    def item(self, item_id: str) -> Item:
        """An item by id; CatalogIndexError naming it when unknown."""

    def feature(self, item_id: str) -> np.ndarray:
        """The raw feature of an item, as the encoder gave it (no re-encoding)."""

    def top_items(self, query: np.ndarray, k: int, category: str | None = None) -> list[tuple[Item, float]]:
        """The ``k`` items nearest a raw query feature (within a category), with their scores, best first."""

    def add(self, items: Sequence[Item], features: np.ndarray) -> None:
        """Add items with their raw features; an id already present is an error, and then nothing is added."""

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many. Unknown ids are an error, and then nothing is removed."""
