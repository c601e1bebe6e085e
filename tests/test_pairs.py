"""Image-text pairs: the data set (files, sidecar folders, their bad inputs), the synthetic catalogs' titles, pair
retrieval against a brute-force reference, and image-text training end to end (it learns, resumes exactly and
writes an encoder the other tools load)."""
import json
import shutil

import numpy as np
import pytest
import torch

from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_pairs import main as train_pairs
from clip4cir.core.errors import DataError
from clip4cir.data.sources import open_source
from clip4cir.data.sources.pairs import hashed_split
from clip4cir.data.synthetic import make_synthetic_cirr
from clip4cir.data.synthetic.garments import NOUNS, PALETTE, Catalog, title
from clip4cir.evaluation.pairs import pair_ranks
from clip4cir.models.encoder_file import load_encoder
from clip4cir.training.checkpointing import RunDir, read_metrics

BASE = ["--quiet", "--workers", "0", "--device", "cpu"]


def brute_force_ranks(images: np.ndarray, texts: np.ndarray, image_of_text: np.ndarray):
    """The same ranks by sorting every score row (stable: ties to the lower index)."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    scores = texts @ images.T
    t2i = [list(np.argsort(-row, kind="stable")).index(image_of_text[j]) for j, row in enumerate(scores)]
    i2t = [min(list(np.argsort(-row, kind="stable")).index(j) for j in np.flatnonzero(image_of_text == i))
           for i, row in enumerate(scores.T)]
    return t2i, i2t


def test_pair_ranks_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((30, 8)).astype(np.float32)
    image_of_text = np.concatenate([np.arange(30), rng.integers(0, 30, 20)])  # some images have several texts
    texts = (images[image_of_text] + rng.standard_normal((50, 8)) * 1.5).astype(np.float32)
    texts[5] = texts[4] * 2  # a tie (cosine equal)
    expected_t2i, expected_i2t = brute_force_ranks(images, texts, image_of_text)
    for chunk in (1024, 7):  # one block, and blocks that cut the images
        t2i, i2t = pair_ranks(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(image_of_text),
                              chunk)
        assert t2i.tolist() == expected_t2i and i2t.tolist() == expected_i2t
    assert 0 < sum(r == 0 for r in expected_t2i) < 50  # neither trivial nor hopeless


def write_images(folder, names):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        Image.new("RGB", (16, 16), (n * 10 % 256, 0, 0)).save(folder / f"{name}.jpg")


def test_pairs_files_and_folders_and_their_bad_inputs(tmp_path):
    names = [f"item{i}" for i in range(40)]
    write_images(tmp_path / "shop", names)
    rows = [{"image": f"{n}.jpg", "text": f"a product called {n}"} for n in names]
    rows.append({"image": "item0", "text": "another title of item0"})
    (tmp_path / "shop" / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = open_source(tmp_path / "shop" / "pairs.jsonl")  # recognised: a JSONL of image,text rows
    assert source.kind == "pairs" and set(source.splits()) >= {"train", "val"}
    texts = {i: t for split in source.splits() for i, t in source.texts(split).items()}
    assert texts["item0"] == ("a product called item0", "another title of item0") and len(texts) == 40
    for split in source.splits():  # split by image: each image's texts in one split, by its id's hash
        assert all(hashed_split(i) == split for i in source.texts(split))
    # a CSV with a split column keeps the user's splits
    (tmp_path / "shop" / "pairs.csv").write_text("image,text,split\n" + "".join(
        f"{n}.jpg,title {n},{'val' if i < 5 else 'train'}\n" for i, n in enumerate(names)))
    csv_source = open_source(tmp_path / "shop" / "pairs.csv")
    assert csv_source.kind == "pairs" and sorted(csv_source.texts("val")) == sorted(names[:5])
    # a folder of images with sidecar texts
    folder = tmp_path / "sidecars"
    write_images(folder, names)
    for n in names:
        (folder / f"{n}.txt").write_text(f"title of {n}\n\nsecond line of {n}\n")
    sidecars = open_source(folder, "pairs")
    assert sidecars.texts(hashed_split("item3"))["item3"] == ("title of item3", "second line of item3")
    (folder / "item7.txt").unlink()
    with pytest.raises(DataError, match=r"1 of 40 images have no text.*item7"):
        open_source(folder, "pairs")
    bad = {"missing image": ({"image": "nope.jpg", "text": "x"}, r"line 1: image 'nope.jpg' is not in"),
           "empty text": ({"image": "item1.jpg", "text": " "}, r"line 1: field 'text' is missing or empty"),
           "bad split": ({"image": "item1.jpg", "text": "x", "split": "dev"}, r"split 'dev' is not one of")}
    for name, (row, message) in bad.items():
        path = tmp_path / "shop" / f"bad-{name.replace(' ', '-')}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            open_source(path, "pairs")
    two_splits = tmp_path / "shop" / "two-splits.jsonl"
    two_splits.write_text("".join(json.dumps({"image": "item1.jpg", "text": t, "split": s}) + "\n"
                                  for t, s in (("a", "train"), ("b", "val"))))
    with pytest.raises(DataError, match="line 2: image 'item1.jpg' is in the val split here and in the train"):
        open_source(two_splits, "pairs")


def test_synthetic_titles_name_a_true_subset_of_attributes_and_keep_the_catalog(tiny_root, tmp_path):
    catalog, named = Catalog(3, wide=True), {"colour": 0, "sleeves": 0, "relative": 0}
    for n in range(300):
        item = catalog.item(("dress", "shirt", "toptee")[n % 3])
        text = title(item).lower()
        assert title(item) == title(item) and any(noun in text for noun in NOUNS[item.category])
        assert not [c for c in PALETTE if c != item.colour and c in text.split()]  # no colour it does not have
        named["colour"] += item.colour in text.split()
        named["sleeves"] += any(w in text for w in ("sleeveless", "no sleeves", f"{item.sleeves} sleeves",
                                                   f"{item.sleeves}-sleeved"))
        named["relative"] += " that " in text
    assert 0.75 * 300 < named["colour"] < 0.95 * 300 and 0.35 * 300 < named["sleeves"] < 0.65 * 300
    assert 0.15 * 300 < named["relative"] < 0.35 * 300
    source = open_source(tiny_root / "pairs.jsonl")
    fashioniq = open_source(tiny_root)
    for split in ("train", "val", "test"):  # every image, in its FashionIQ split
        assert {i.removeprefix("images/") for i in source.texts(split)} == set(fashioniq.gallery(split))
    cirr = tmp_path / "cirr"
    make_synthetic_cirr(cirr, "tiny", seed=0, workers=1)
    cirr_pairs, cirr_source = open_source(cirr / "pairs.jsonl"), open_source(cirr)
    for ours, theirs in (("train", "train"), ("val", "val"), ("test", "test1")):  # CIRR's images, in its splits
        assert {i.rsplit("/", 1)[-1] for i in cirr_pairs.texts(ours)} == set(cirr_source.gallery(theirs))
    attributes = json.loads((tiny_root / "synthetic_attributes.json").read_text())
    some = next(iter(source.texts("val")))
    assert attributes[some.removeprefix("images/")]["colour"] in source.texts("val")[some][0].lower()


def test_image_text_training_learns_resumes_and_is_evaluated(tiny_root, tmp_path):
    data = tiny_root / "pairs.jsonl"
    args = ["--data", str(data), "--model", "cir-tiny", "--epochs", "6", "--batch-size", "16", "--lr", "1e-3",
            "--save-best"] + BASE
    assert train_pairs(args + ["--output", str(tmp_path / "run")]) == 0
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in log] == list(range(6))
    assert log[-1]["loss"] < log[0]["loss"] - 0.1
    assert log[-1]["logit_scale"] != pytest.approx(log[0]["logit_scale"], abs=1e-3)  # the scale learns
    assert {"text→image R@10", "image→text R@10"} <= set(log[-1]["average"])
    out = tmp_path / "pairs.json"
    encoder = tmp_path / "run" / "best.safetensors"
    assert evaluate_main(["--data", str(data), "--task", "pairs", "--split", "val", "--clip-checkpoint",
                          str(encoder), "--json", str(out)] + BASE[:3]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 72 and metrics["text→image R@10"] == pytest.approx(
        max(r["average"]["text→image R@10"] for r in log if r["score"] == max(x["score"] for x in log)))
    # interrupted and resumed: the same weights as straight through
    assert train_pairs(args + ["--output", str(tmp_path / "part"), "--max-steps", "7"]) == 0
    assert train_pairs(args + ["--output", str(tmp_path / "part"), "--resume"]) == 0
    straight = load_encoder(RunDir(tmp_path / "run").latest_checkpoint() / "model.safetensors").model.state_dict()
    resumed = load_encoder(RunDir(tmp_path / "part").latest_checkpoint() / "model.safetensors").model.state_dict()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


def test_image_text_training_refuses_bad_inputs_before_any_work(tiny_root, tmp_path, capsys):
    from clip4cir.commands.common import run
    cases = {"triplets, not pairs": (["--data", str(tiny_root)], "has no train image-text pairs"),
             "too large a batch": (["--data", str(tiny_root / "pairs.jsonl"), "--batch-size", "500"],
                                   "--batch-size 500 is larger than")}
    for name, (data, message) in cases.items():
        output = tmp_path / name.replace(" ", "-")
        assert run(train_pairs, data + ["--model", "cir-tiny", "--output", str(output)] + BASE) == 2, name
        assert message in capsys.readouterr().err, name
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    victim = next((broken / "images").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert run(train_pairs, ["--data", str(broken / "pairs.jsonl"), "--model", "cir-tiny", "--batch-size", "16",
                             "--output", str(tmp_path / "never")] + BASE) == 2
    assert "cannot be read" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_the_base_model_command_writes_one_folder_measured_on_a_catalog_it_never_saw(tmp_path, capsys):
    from clip4cir.commands.common import run
    from clip4cir.commands.make_base_model import main as make_base
    args = ["--work", str(tmp_path / "work"), "--images", "240", "--epochs", "2", "--batch-size", "32",
            "--held-out-size", "tiny", "--workers", "0"]
    assert make_base(args + ["--out", str(tmp_path / "base")]) == 0
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["encoder.safetensors", "manifest.json",
                                                                     "metrics.json"]
    report = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"random init", "base"}
    assert report["metrics"]["base"]["images"] == 72  # the held-out catalog's val images, not the corpus's
    corpus = open_source(tmp_path / "work" / "corpus-240" / "pairs.jsonl")
    held_out = open_source(tmp_path / "work" / "heldout-tiny")
    corpus_images = {i.removeprefix("images/") for s in corpus.splits() for i in corpus.gallery(s)}
    assert not corpus_images & {i for s in held_out.splits() for i in held_out.gallery(s)}
    assert load_encoder(tmp_path / "base" / "encoder.safetensors").has_text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert run(make_base, args + ["--out", str(tmp_path / "mine")]) == 2  # a folder of the user's is never written
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and "--out" in capsys.readouterr().err


def test_a_hugging_face_data_set_with_a_caption_column_is_image_text_pairs(tiny_root, tmp_path):
    import datasets
    pairs = open_source(tiny_root / "pairs.jsonl")
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        texts = pairs.texts(split)
        splits[name] = datasets.Dataset.from_dict(
            {"image": [pairs.path(i) for i in texts], "sku": [i.removeprefix("images/") for i in texts],
             "title": [list(t) for t in texts.values()]},
            features=datasets.Features({"image": datasets.Image(), "sku": datasets.Value("string"),
                                        "title": datasets.Sequence(datasets.Value("string"))}))
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hub"))
    source = open_source(tmp_path / "hub", id_column="sku", caption_column="title")
    some = next(iter(pairs.texts("val")))
    assert source.texts("validation")[some.removeprefix("images/")] == pairs.texts("val")[some]
    assert open_source(tmp_path / "hub", id_column="sku").texts("train") == {}  # no caption column: a catalog
    assert train_pairs(["--data", str(tmp_path / "hub"), "--id-column", "sku", "--caption-column", "title",
                        "--model", "cir-tiny", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
                        "--output", str(tmp_path / "run")] + BASE) == 0
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["average"]["images"] == 72  # validated on the validation split
