"""Title-aware composed queries: the reference's title put around the caption (``--title-template``) in the data,
in both training stages, in evaluation and in the app."""
import logging
import pickle

import numpy as np
import pytest
import torch

from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_clip import main as train_main
from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.core.errors import DataError
from clip4cir.data.captions import CAPTION_ONLY, caption_variants, check_title_template, framed, title_frame
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources import open_source, reopen
from clip4cir.data.sources.base import TitledCaptions
from clip4cir.models.combiner import load_combiner
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.factory import create_model
from clip4cir.models.runtime import Towers
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.item_table import Item
from clip4cir.retrieval.search import SearchEngine
from combiner.feature_cache import triplet_features

TEMPLATE = "{title} that {caption}"
TRAIN = ["--model", "cir-tiny", "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "1", "--save-best"]


@pytest.mark.parametrize("template", ["{title}", "{caption}", "{title} {caption} {size}", "{title} {title} {caption}",
                                      "{title}, {caption}, {}", "no fields"])
def test_a_template_without_exactly_its_two_fields_is_refused(template, tiny_root):
    with pytest.raises(DataError, match="--title-template"):
        check_title_template(template)
    with pytest.raises(DataError, match="--title-template"):
        open_source(tiny_root, title_template=template)


def test_a_caption_is_put_in_its_title_frame():
    frame = title_frame(TEMPLATE, "  Red  striped dress ")
    assert framed("Is blue and has long sleeves", frame) == "Red striped dress that is blue and has long sleeves"
    assert framed("V-neck please", frame) == "Red striped dress that V-neck please"  # an initialism keeps its case
    assert title_frame(TEMPLATE, "") == title_frame(TEMPLATE, None) == CAPTION_ONLY
    assert framed("Is blue", CAPTION_ONLY) == "Is blue"
    # a title's braces are never taken for the caption's place
    assert framed("is blue", title_frame(TEMPLATE, "the {caption} dress")) == "the (caption) dress that is blue"
    assert caption_variants(["is blue", "has stripes"], frame) == [
        "Red striped dress that is blue and has stripes", "Red striped dress that has stripes and is blue",
        "Red striped dress that is blue", "Red striped dress that has stripes"]


def test_titled_triplets_hold_their_references_titles(tiny_root):
    plain, titled = open_source(tiny_root), open_source(tiny_root, title_template=TEMPLATE)
    titles = plain.titles()
    for split in ("train", "val"):
        for p, t in zip(plain.triplets(split), titled.triplets(split), strict=True):
            assert (t.reference, t.target, t.captions) == (p.reference, p.target, p.captions)
            assert t.eval_caption() == framed(p.eval_caption(), title_frame(TEMPLATE, titles[p.reference]))
            assert t.eval_caption().startswith(" ".join(titles[p.reference].split()) + " that ")
    assert reopen(titled.record()).triplets("val") == titled.triplets("val")
    assert pickle.loads(pickle.dumps(titled)).triplets("val") == titled.triplets("val")  # DataLoader workers
    # the captions' fingerprint differs (no stale caption features); the gallery's does not (its features are kept)
    assert titled.fingerprint("val") == plain.fingerprint("val")
    assert TripletDataset(titled, "val", check_images=False).fingerprint() != \
        TripletDataset(plain, "val", check_images=False).fingerprint()
    assert titled.gallery("val") == plain.gallery("val") and titled.categories() == plain.categories()
    # a reference without a title (e.g. an uploaded photo) keeps its caption alone
    untitled = TitledCaptions(plain, TEMPLATE, titles={})
    assert [t.eval_caption() for t in untitled.triplets("val")] == [p.eval_caption() for p in plain.triplets("val")]


def test_titles_are_needed_for_a_title_template(tiny_root, tmp_path):
    import shutil
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    (root / "pairs.jsonl").unlink()
    with pytest.raises(DataError, match="has no titles"):
        open_source(root, title_template=TEMPLATE)


def test_both_stages_train_on_titled_captions_and_evaluation_reads_them_as_trained(tiny_root, tmp_path, caplog):
    titles = open_source(tiny_root).titles()
    assert train_main(["--data", str(tiny_root), "--output", str(tmp_path / "s1"), "--title-template", TEMPLATE]
                      + TRAIN) == 0
    encoder_file = tmp_path / "s1" / "best.safetensors"
    encoder = load_encoder(encoder_file)
    assert encoder.info["data"]["train"]["source"]["title_template"] == TEMPLATE
    data = TripletDataset(open_source(tiny_root, title_template=TEMPLATE), "train", check_images=False)
    assert all(data.caption(i).startswith(" ".join(titles[t.reference].split()))
               for i, t in enumerate(data.triplets))
    # stage two's cached caption features are the titled captions' (keyed apart from the plain ones)
    plain = TripletDataset(open_source(tiny_root), "train", check_images=False)
    titled_features, _ = triplet_features(encoder, data, tmp_path / "cache", progress=False)
    plain_features, _ = triplet_features(encoder, plain, tmp_path / "cache", progress=False)
    assert not torch.allclose(titled_features.text, plain_features.text)
    assert combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "s2"), "--clip-checkpoint",
                          str(encoder_file), "--title-template", TEMPLATE, "--cache-dir", str(tmp_path / "cache")]
                         + TRAIN) == 0
    combiner = load_combiner(tmp_path / "s2" / "best.safetensors", encoder=encoder)[0]
    assert combiner.title_template == TEMPLATE
    caplog.set_level(logging.INFO)
    for mode in (["--combiner", str(tmp_path / "s2" / "best.safetensors")], ["--mode", "sum"]):
        caplog.clear()
        assert evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--quiet"] + mode) == 0
        assert f"as the model was trained: {TEMPLATE!r}" in caplog.text


class KeywordTowers(Towers):
    """A text tower that knows four words (red, blue, striped, plain): each text's feature counts them."""

    WORDS = ("red", "blue", "striped", "plain")

    def text(self, texts):
        out = torch.zeros(len(texts), self.encoder.dim)
        for row, text in enumerate(texts):
            for column, word in enumerate(self.WORDS):
                out[row, column] = float(word in text.split())
        return out


@pytest.fixture
def keyword_engine(tmp_path):
    """A catalog of three items whose image features say: a red item whose stripes the photo does not show (its
    title does), the blue striped item wanted, and a blue plain one that looks a little more like the query
    without the title."""
    encoder = create_model("cir-tiny")
    features = np.zeros((3, encoder.dim), dtype=np.float32)
    features[0, 0] = 1.0  # red
    features[1, [1, 2]] = 1.0  # blue, striped
    features[2, [1, 3]] = 1.0, 0.9  # blue, a little plain
    items = [Item(i, f"{i}.jpg") for i in ("reference", "wanted", "look-alike")]
    index = CatalogIndex.create(tmp_path / "index", items, features, encoder=encoder.record(),
                                titles={"reference": "striped dress", "wanted": "blue striped dress",
                                        "look-alike": "blue plain dress"})
    return SearchEngine(index, encoder, towers=KeywordTowers(encoder))


def test_a_title_aware_model_finds_what_the_title_and_caption_say_together(keyword_engine):
    engine = keyword_engine
    untitled = engine.composed_search("is blue", reference_id="reference", mode="sum", k=2)
    assert [h.id for h in untitled.hits] == ["look-alike", "wanted"]  # the photo alone does not show the stripes
    engine.encoder.info = {"data": {"train": {"source": {"title_template": TEMPLATE}}}}  # trained title-aware
    titled = engine.composed_search("is blue", reference_id="reference", mode="sum", k=2)
    assert [h.id for h in titled.hits] == ["wanted", "look-alike"]
    assert titled.hits[0].score > untitled.hits[1].score
    # an uploaded photo has no title: the caption alone, and the answer says so
    upload = engine.composed_search("is blue", image=engine_photo(), mode="sum", k=2)
    assert "the reference has no title: the caption alone was read" in upload.notes


def engine_photo():
    from PIL import Image
    return Image.new("RGB", (32, 48), (200, 30, 40))
