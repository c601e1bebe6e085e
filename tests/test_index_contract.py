"""One contract for every store behind the index interface (clip4cir.retrieval.index_protocol.Index): the same
tests run on the FAISS files and on a collection of a real Milvus server (slow: it starts one). The truth is brute
force over the raw features, computed here."""
import inspect
import itertools

import numpy as np
import pytest
from helpers import mixture, wait_until

from clip4cir.core.errors import CatalogIndexError
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.item_table import Item
from clip4cir.retrieval.milvus_index import MilvusIndex
from clip4cir.retrieval.stores import STORES, load_index

DIM = 16
COLLECTIONS = itertools.count()


def catalog(n: int = 60, start: int = 0, seed: int = 0) -> tuple[list[Item], np.ndarray]:
    """Items in two categories (every fifth in both) and raw features of varied lengths, as an encoder gives."""
    x = mixture(n, DIM, clusters=6, seed=seed) * np.random.default_rng(seed).uniform(0.5, 3.0, (n, 1))
    items = [Item(f"item{start + i:03d}", f"/catalog/{start + i}.jpg",
                  ("a", "b") if i % 5 == 0 else (("a",) if i % 2 else ("b",))) for i in range(n)]
    return items, x.astype(np.float32)


def brute_force(items: list[Item], x: np.ndarray, query: np.ndarray, k: int, category: str | None = None):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    order = [i for i in np.argsort(-scores, kind="stable") if category is None or category in items[i].categories]
    return [items[i].id for i in order[:k]], scores[order[:k]]


@pytest.fixture(params=["faiss", pytest.param("milvus", marks=pytest.mark.slow)])
def store(request):
    """How to build an index of each store: (name, create(path, items, features, **options))."""
    options = {}
    if request.param == "milvus":
        options = {"uri": request.getfixturevalue("milvus_server").uri}

    def create(path, items, features, **more):
        if request.param == "milvus":
            more["collection"] = f"contract_{next(COLLECTIONS)}"
        return STORES[request.param].create(path, items, features, **options, **more)
    return request.param, create


def eventually(check) -> None:
    """A change shows at once in FAISS and within Milvus's bounded staleness (seconds) in a collection."""
    assert wait_until(check, 15), "the change did not show"


def test_both_stores_declare_every_method_of_the_interface_with_its_signature():
    members = [name for name, value in vars(Index).items()
               if not name.startswith("_") or name in ("__len__", "__contains__")]
    assert {"top_items", "feature", "add", "remove", "sample", "find_ids", "dim"} <= set(members)
    for cls in (CatalogIndex, MilvusIndex):
        for name in members:
            declared = getattr(Index, name)
            if isinstance(declared, property):
                assert isinstance(getattr(cls, name), property), (cls.__name__, name)
                continue
            want = inspect.signature(declared).parameters
            got = inspect.signature(getattr(cls, name)).parameters
            assert [(p.name, p.default) for p in want.values()] == [(p.name, p.default) for p in got.values()], \
                (cls.__name__, name)


def test_what_is_in_it(store, tmp_path):
    _, create = store
    items, x = catalog()
    index = create(tmp_path / "index", items, x, titles={"item001": "A red shirt"},
                   captions={"item001": [["is blue", "item002"]]})
    assert isinstance(index, Index)
    assert len(index) == 60 and index.dim == DIM and index.categories() == ["a", "b"]
    assert "item007" in index and "nope" not in index
    assert index.item("item005") == items[5]
    np.testing.assert_allclose(index.feature("item007"), x[7], rtol=1e-5, atol=1e-5)  # raw, length kept
    assert sorted(index.ids()) == [i.id for i in items] and len(index.ids(7)) == 7
    assert index.find_ids("item01") == [f"item{i:03d}" for i in range(10, 20)]
    assert index.find_ids("item01", limit=3) == ["item010", "item011", "item012"]
    page = index.sample(8, "b", seed=3)
    assert len(set(page)) == 8 and all("b" in index.item(i).categories for i in page)
    assert index.sample(8, "b", seed=3) == page
    with pytest.raises(CatalogIndexError, match="unknown item id 'nope'"):
        index.item("nope")
    reopened = load_index(tmp_path / "index")
    assert reopened.titles == {"item001": "A red shirt"} and reopened.captions == {"item001": [["is blue", "item002"]]}
    assert len(reopened) == 60 and reopened.kind == index.kind


def test_top_items_are_the_brute_force_neighbours(store, tmp_path):
    _, create = store
    items, x = catalog()
    index = create(tmp_path / "index", items, x)
    queries = mixture(5, DIM, clusters=6, seed=9) * 2.5
    for category in (None, "a", "b"):
        for query in queries:
            ids, scores = brute_force(items, x, query, 7, category)
            found = index.top_items(query, 7, category)
            assert [item.id for item, _ in found] == ids
            np.testing.assert_allclose([s for _, s in found], scores, atol=1e-4)
    with pytest.raises(CatalogIndexError, match="unknown category 'shoes'"):
        index.top_items(queries[0], 3, "shoes")


def test_added_items_are_found_and_a_repeated_id_adds_nothing(store, tmp_path):
    _, create = store
    items, x = catalog()
    index = create(tmp_path / "index", items, x)
    more, y = catalog(5, start=60, seed=1)
    index.add(more, y)
    eventually(lambda: len(index) == 65 and "item062" in index)
    assert index.top_items(y[2], 1)[0][0].id == "item062"
    with pytest.raises(CatalogIndexError, match="item060"):
        index.add([Item("item999", "/catalog/999.jpg"), more[0]], np.vstack([y[0], y[0]]))
    assert "item999" not in index and len(index) == 65
    with pytest.raises(CatalogIndexError, match="shape"):
        index.add(more[:1], y[:1, :4])


def test_removed_items_are_gone_and_an_unknown_id_removes_nothing(store, tmp_path):
    _, create = store
    items, x = catalog()
    index = create(tmp_path / "index", items, x)
    with pytest.raises(CatalogIndexError, match="unknown item id 'nope'"):
        index.remove(["item003", "nope"])
    assert "item003" in index and len(index) == 60
    assert index.remove(["item003", "item004", "item003"]) == 2
    eventually(lambda: "item003" not in index and len(index) == 58)
    found = {item.id for item, _ in index.top_items(x[3], 10)}
    assert found and not found & {"item003", "item004"}
