"""The catalog's words in search: titles stored in the index, suggestions that are single annotations, the
category a caption names, and match levels calibrated on known right answers."""
import json

import numpy as np
import pytest

from clip4cir.data.sources import open_source
from clip4cir.models.combiner import Combiner
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import create_model
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import annotated_captions, catalog_items
from clip4cir.retrieval.category_words import category_words, named_category
from clip4cir.retrieval.match_levels import MatchLevels, calibrate_levels
from clip4cir.retrieval.search import NOTHING_FITS, SearchEngine
from clip4cir.retrieval.stores import load_index

TITLES = [("red t-shirt with a star print", ("toptee",)), ("blue tee", ("toptee",)), ("black tee", ("toptee",)),
          ("white t-shirt", ("toptee",)), ("grey tee with it on", ("toptee",)), ("green t-shirt", ("toptee",)),
          ("red maxi dress", ("dress",)), ("blue frock", ("dress",)), ("plaid dress", ("dress",)),
          ("white frock with it", ("dress",)), ("mini dress", ("dress",)), ("black frock", ("dress",))]


def test_category_words_are_learned_from_titles():
    words = category_words(TITLES, ["dress", "toptee"])
    assert {w: words[w] for w in ("t-shirt", "tee", "frock", "dress", "toptee")} == {
        "t-shirt": "toptee", "tee": "toptee", "frock": "dress", "dress": "dress", "toptee": "toptee"}
    assert "it" not in words and "red" not in words and "with" not in words  # in both, or in too few


@pytest.mark.parametrize("caption, named", [
    ("is a t-shirt instead of a dress", ("toptee", "t-shirt")),
    ("is a frock rather than a tee", ("dress", "frock")),
    ("make it a frock, not a tee", ("dress", "frock")),
    ("a frock in the same colour", ("dress", "frock")),
    ("is red", None),
    ("the tee is red", None),  # named in passing: the reference's category stays
    ("is a tee or is a frock", None),  # two categories: not a change the app can honour
])
def test_the_category_a_caption_names(caption, named):
    assert named_category(caption, category_words(TITLES, ["dress", "toptee"])) == named


def test_suggestions_are_single_annotations_without_repeats(tiny_root):
    source = open_source(tiny_root)
    ids = set(source.gallery("val"))
    suggested = annotated_captions(source, ids)
    written = {c.strip(" .").lower() for split in ("val",) for t in source.triplets(split) for c in t.captions}
    assert suggested
    for captions in suggested.values():
        texts = [c.lower() for c, _ in captions]
        assert len(set(texts)) == len(texts) and set(texts) <= written  # each one annotation, as written


def test_the_index_keeps_titles_and_a_half_precision_encoder_gives_the_same_search(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    save_encoder(encoder, tmp_path / "full.safetensors")
    save_encoder(encoder, tmp_path / "half.safetensors", half=True)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * (tmp_path / "full.safetensors").stat().st_size
    half = load_encoder(tmp_path / "half.safetensors")
    source = open_source(tiny_root)
    index, _ = build_index(half, source, catalog_items(source, ["val"]), tmp_path / "index",
                           BuildOptions(progress=False))
    pairs = {json.loads(line)["image"].split("/")[-1][:-4]: json.loads(line)["text"]
             for line in (tiny_root / "pairs.jsonl").read_text().splitlines()}
    loaded = load_index(tmp_path / "index")
    assert loaded.titles and all(pairs[i] == t for i, t in loaded.titles.items())
    assert set(loaded.titles) == set(loaded.ids(len(loaded)))
    engine = SearchEngine(loaded, half, Combiner(half.dim))
    hit = engine.text_search("a red dress", k=3).hits[0]
    assert hit.title == loaded.titles[hit.id] and hit.match in ("strong match", "good match", "weak match")


def brute_levels(sample, scores, query):
    """The z-score of a score against the query's scores over the sample, by hand."""
    spread = sample @ (query / np.linalg.norm(query))
    return [(s - spread.mean()) / spread.std() for s in scores]


def test_match_levels_against_a_brute_force_reference():
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((300, 16)).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    query = rng.standard_normal(16).astype(np.float32)
    levels = MatchLevels(sample, {"text": {"strong match": 2.0, "good match": 1.0, "fits": 1.5}})
    assert levels.z(query, [0.5, 0.1]) == pytest.approx(brute_levels(sample, [0.5, 0.1], query), rel=1e-4)
    assert [levels.level("text", z) for z in (2.5, 1.2, 0.3)] == ["strong match", "good match", "weak match"]
    assert levels.fits("text", 1.4) is False and levels.fits("text", 1.6) is True and levels.fits("composed", 0) is None


def test_calibration_puts_half_the_right_answers_at_strong():
    from clip4cir.retrieval.match_levels import RightAnswers
    rng = np.random.default_rng(1)
    items = {f"i{n}": v / np.linalg.norm(v) for n, v in enumerate(rng.standard_normal((400, 8)))}
    queries = np.stack([items[f"i{n}"] + 0.3 * rng.standard_normal(8) for n in range(200)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    answers = {"text": RightAnswers(queries, [f"i{n}" for n in range(200)])}
    sample = np.stack(list(items.values()))
    matrix = np.stack(list(items.values()))
    levels = calibrate_levels(sample, answers, items.__getitem__, lambda q: float((matrix @ q).max()))
    own = [levels.z(q, [float(q @ items[f"i{n}"])])[0] for n, q in enumerate(queries)]
    strong = np.mean([levels.level("text", z) == "strong match" for z in own])
    weak = np.mean([levels.level("text", z) == "weak match" for z in own])
    assert strong == pytest.approx(0.5, abs=0.02) and weak == pytest.approx(0.2, abs=0.02)


def test_nonsense_on_the_demo_is_said_not_to_fit():
    from clip4cir.serving import service
    engine = service.load_engine(service.Options(device="cpu"))
    result = engine.text_search("xqzv blorft wuggle 1234", k=3)
    assert result.fits is False and NOTHING_FITS in result.notes
    good = engine.text_search(next(iter(engine.index.titles.values())), k=3)
    assert good.fits is True and NOTHING_FITS not in good.notes


@pytest.mark.slow
def test_the_storefront_benchmark_measures_the_demo(tmp_path):
    from clip4cir.commands.benchmark import main
    assert main(["storefront", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "storefront.json").read_text())
    held = report["levels"]["text"]
    assert sum(held[name]["percent"] for name in ("strong match", "good match", "weak match")) == \
        pytest.approx(100, abs=0.2)
    assert 3 <= held["told nothing fits"]["percent"] <= 25  # calibrated at one in ten on the other half
    assert report["category"]["cross-category queries honoured"]["percent"] > 50
    assert "| cross-category queries honoured |" in (tmp_path / "storefront.md").read_text()


def test_titles_of_items_without_categories_name_no_category():
    """A catalog of titled images with no categories (a folder with pairs.jsonl) has no category words, and
    nothing fails on it (it raised IndexError on the first composed search)."""
    titled = [("striped dress", ()), ("blue striped dress", ()), ("red shirt", ("shirt",))] * 10
    assert category_words(titled, ["shirt"]) == {"shirt": "shirt", "red": "shirt"}  # words of uncategorised ones: none
    assert category_words([("striped dress", ())] * 30, []) == {}
