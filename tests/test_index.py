import json
import threading

import numpy as np
import pytest
from PIL import Image

from clip4cir.build_index import build_index, main as build_main
from clip4cir.catalog import fashioniq_items, folder_items
from clip4cir.index import CatalogIndex, CatalogIndexError, Item
from clip4cir.models import ModelError, create_model, save_encoder
from clip4cir.search import SearchEngine, SearchError, main as search_main


def mixture(n, d=512, clusters=300, seed=0, spread=1.0):
    """Normalised vectors with cluster structure, like image embeddings (uniform noise has no real neighbours)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(x, kind="flat", metric="cosine", categories=("a", "b", "c"), **knobs):
    index = CatalogIndex(x.shape[1], kind, metric, **knobs)
    items = [Item(f"id{i}", f"/img/{i}.jpg", categories[i % len(categories)]) for i in range(len(x))]
    index.add(items, x)
    return index


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32) * rng.uniform(0.5, 2, (500, 1)).astype(np.float32)
    q = rng.standard_normal((20, 32)).astype(np.float32)
    index = make_index(x, metric=metric)
    scores, rows = index.search(q, 10)
    xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, expected)
    expected_scores = np.take_along_axis(sims, expected, 1)
    if metric == "euclidean":
        expected_scores = -np.sqrt(np.maximum(2 - 2 * expected_scores, 0))
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_reach_recall_with_default_knobs(kind):
    x = mixture(50_000)
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 500, replace=False)] + 0.05 * rng.standard_normal((500, 512)).astype(np.float32)
    exact = make_index(x)
    _, truth = exact.search(q, 10)
    _, found = make_index(x, kind).search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_category_filter_add_remove_save_load(kind, tmp_path):
    x = mixture(3000, d=64, clusters=30)
    index = make_index(x, kind)
    for category in ("a", "b", "c"):
        _, rows = index.search(x[:20], 50, category=category)
        assert all(index.items[r].category == category for r in rows.ravel() if r >= 0)
        assert (rows >= 0).all()
    _, rows = index.search(x[5:6], 1)
    assert index.items[rows[0, 0]].id == "id5"
    assert index.remove(["id5", "id6"]) == 2 and len(index) == 2998
    _, rows = index.search(x[5:7], 20)
    assert not {"id5", "id6"} & {index.items[r].id for r in rows.ravel()}
    index.add([Item("new", "/img/new.jpg", "b")], x[5:6] * 2)
    _, rows = index.search(x[5:6], 1, category="b")
    assert index.items[rows[0, 0]].id == "new"
    with pytest.raises(CatalogIndexError, match="'new'"):
        index.add([Item("new", "/x.jpg", "b")], x[:1])
    with pytest.raises(CatalogIndexError, match="'gone'"):
        index.remove(["gone"])
    with pytest.raises(CatalogIndexError, match="'zzz'"):
        index.search(x[:1], 5, category="zzz")
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # over an existing index
    loaded = CatalogIndex.load(tmp_path / "idx")
    assert len(loaded) == len(index) and loaded.kind == kind
    np.testing.assert_array_equal(loaded.search(x[:5], 10)[1], index.search(x[:5], 10)[1])
    np.testing.assert_array_equal(loaded.feature("new"), x[5] * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_index_files_and_knobs(tmp_path):
    with pytest.raises(CatalogIndexError, match="'annoy'"):
        CatalogIndex(8, "annoy")
    with pytest.raises(CatalogIndexError, match="nprobe"):
        CatalogIndex(8, "ivf", nprobe=0)
    with pytest.raises(CatalogIndexError, match="no meta.json"):
        CatalogIndex.load(tmp_path)
    (tmp_path / "meta.json").write_text("{bad")
    with pytest.raises(CatalogIndexError, match="meta.json"):
        CatalogIndex.load(tmp_path)


@pytest.fixture(scope="module")
def engine_files(tiny_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    encoder = create_model("cir-tiny")
    save_encoder(encoder, folder / "enc.safetensors")
    assert build_main(["--data", str(tiny_root), "--clip-checkpoint", str(folder / "enc.safetensors"),
                       "--output", str(folder / "index"), "--quiet", "--workers", "0"]) == 0
    from combiner.model import Combiner, save_combiner
    save_combiner(Combiner(encoder.dim), folder / "combiner.safetensors", encoder.record())
    return folder


@pytest.fixture(scope="module")
def engine(engine_files):
    return SearchEngine.load(engine_files / "index", combiner_path=engine_files / "combiner.safetensors",
                             device="cpu")


def test_three_query_kinds(engine, tiny_root):
    triplet = json.loads((tiny_root / "captions" / "cap.dress.val.json").read_text())[0]
    item = engine.index.item(triplet["candidate"])
    by_id = engine.composed_search("is blue", reference_id=item.id, k=5, mode="sum")
    by_image = engine.composed_search("is blue", image=item.path, k=6, mode="sum")
    assert len(by_id.hits) == 5 and item.id not in [h.id for h in by_id.hits]
    # the stored feature is the feature of the image: the same ranking (minus the reference itself)
    assert [h.id for h in by_id.hits] == [h.id for h in by_image.hits if h.id != item.id][:5]
    assert len(engine.composed_search("is blue", reference_id=item.id, k=3).hits) == 3  # combiner mode
    similar = engine.image_search(item.path, k=3)
    assert similar.hits[0].id == item.id and similar.hits[0].score == pytest.approx(1.0, abs=1e-4)
    text = engine.text_search("a red dress", k=4, category="dress")
    assert len(text.hits) == 4 and all(h.category == "dress" for h in text.hits) and text.seconds > 0


def test_auto_category_uses_the_probe(engine):
    ids = [i for i in engine.index.row_of]
    predicted = [engine.image_search(engine.index.item(i).path, k=1, category="auto") for i in ids[:30]]
    right = sum(r.category == engine.index.item(i).category for r, i in zip(predicted, ids))
    assert all(any("predicted category" in n for n in r.notes) for r in predicted)
    assert all(h.category == r.category for r in predicted for h in r.hits)
    assert right >= 20  # the probe is trained on these very features


def test_bad_queries(engine, tmp_path):
    some_id = next(iter(engine.index.row_of))
    cases = [
        (lambda: engine.composed_search("", reference_id=some_id), "caption is empty"),
        (lambda: engine.composed_search("   ", image=engine.index.item(some_id).path), "caption is empty"),
        (lambda: engine.composed_search("is red"), "no reference"),
        (lambda: engine.composed_search("is red", reference_id="nope"), "'nope'"),
        (lambda: engine.composed_search("is red", reference_id=some_id, mode="max"), "'max'"),
        (lambda: engine.image_search(None), "no image"),
        (lambda: engine.image_search(engine.index.item(some_id).path, k=0), "k must"),
        (lambda: engine.text_search("red", k=10_001), "k must"),
        (lambda: engine.text_search("red", category="hats"), "'hats'"),
        (lambda: engine.text_search("red", category="auto"), "auto"),
        (lambda: engine.image_search(Image.new("RGB", (0, 0))), "empty"),
    ]
    (tmp_path / "not-an-image.jpg").write_text("hello")
    cases.append((lambda: engine.image_search(tmp_path / "not-an-image.jpg"), "not-an-image.jpg"))
    for call, message in cases:
        with pytest.raises(SearchError, match=message):
            call()
    long = engine.text_search(" ".join(["red"] * 500), k=2)
    assert len(long.hits) == 2 and any("tokens" in n for n in long.notes)
    for mode in ("RGBA", "L", "P", "CMYK", "I;16"):
        image = Image.new("RGB", (40, 60), (200, 0, 0)).convert(mode if mode != "I;16" else "L")
        if mode == "I;16":
            image = Image.fromarray(np.full((60, 40), 30000, dtype=np.uint16))
        assert len(engine.image_search(image, k=2).hits) == 2
    assert len(engine.image_search(Image.new("RGB", (6000, 5000), (0, 0, 200)), k=2).hits) == 2


def test_concurrent_queries_match_sequential(engine):
    ids = list(engine.index.row_of)[:12]
    expected = {i: [h.id for h in engine.composed_search("is darker", reference_id=i, k=5).hits] for i in ids}
    got, errors = {}, []

    def worker(i):
        try:
            got[i] = [h.id for h in engine.composed_search("is darker", reference_id=i, k=5).hits]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def test_index_refuses_another_encoder(engine_files):
    index = CatalogIndex.load(engine_files / "index")
    with pytest.raises(SearchError, match="built with encoder"):
        SearchEngine(index, create_model("cir-tiny", seed=9))
    other = engine_files / "other.safetensors"
    save_encoder(create_model("cir-tiny", seed=9), other)
    with pytest.raises(ModelError, match="not the one"):
        SearchEngine.load(engine_files / "index", clip_checkpoint=str(other))


def test_search_command_json(engine_files, capsys):
    index = CatalogIndex.load(engine_files / "index")
    ref = next(iter(index.row_of))
    assert search_main(["--index", str(engine_files / "index"), "--ref-id", ref, "--caption", "is red", "--k", "3",
                        "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and set(hits[0]) == {"id", "score", "category", "path"}
    assert search_main(["--index", str(engine_files / "index"), "--caption", "is red", "--k", "2"]) == 0
    with pytest.raises(SearchError, match="give --image"):
        search_main(["--index", str(engine_files / "index")])


def test_image_folder_catalog_skips_unreadable(tmp_path, tiny_root):
    folder = tmp_path / "shop"
    for category, colour in (("hats", (200, 0, 0)), ("shoes", (0, 0, 200))):
        (folder / category).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (50, 70), colour).save(folder / category / f"{i}.png")
    Image.new("RGB", (50, 70), (0, 200, 0)).save(folder / "loose.jpg")
    (folder / "shoes" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    items = folder_items(folder)
    assert {i.category for i in items} == {"hats", "shoes", None} and len(items) == 8
    index, unreadable = build_index(create_model("cir-tiny"), items, progress=False)
    assert [i.id for i in unreadable] == ["shoes/broken"] and len(index) == 7
    assert index.categories() == ["hats", "shoes"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder_items(tmp_path / "empty")
    assert len(fashioniq_items(tiny_root, "dress", ["val", "test"])) == 24 + 12
