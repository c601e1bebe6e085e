"""The data sets behind one interface: CIRR (the real annotation files, its protocol and test-server files), a
user's own triplets (JSONL, CSV), plain image folders and Hugging Face datasets; training both stages on them."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import shared_annotations
from PIL import Image

from clip4cir.commands.build_index import main as build_main
from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_clip import main as train_main
from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.core.errors import DataError
from clip4cir.data.datasets import GalleryDataset, TripletDataset
from clip4cir.data.sources import open_source
from clip4cir.data.sources.cirr import CIRR
from clip4cir.data.synthetic import make_synthetic_cirr
from clip4cir.evaluation.composed import subset_ranks, target_ranks
from clip4cir.models.factory import create_model
from clip4cir.retrieval.search import SearchEngine

BASE = ["--model", "cir-tiny", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cirr")
    make_synthetic_cirr(root, "tiny", seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def real_cirr(tmp_path_factory):
    """The real CIRR annotation files (no train captions) with a placeholder image at every val and test1 path."""
    shared = shared_annotations("cirr", "CIRR_ANNOTATIONS", "captions")
    root = tmp_path_factory.mktemp("real_cirr")
    shutil.copytree(shared / "captions", root / "cirr" / "captions")
    shutil.copytree(shared / "image_splits", root / "cirr" / "image_splits")
    rng = np.random.default_rng(0)
    for split in ("val", "test1"):
        for relative in json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text()).values():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return root


def test_real_cirr_annotation_files(real_cirr):
    source = open_source(real_cirr)
    assert isinstance(source, CIRR) and source.protocol.name == "cirr"
    assert len(source.triplets("val")) == 4181 and len(source.triplets("test1")) == 4148
    assert [len(source.gallery(s)) for s in ("train", "val", "test1")] == [16939, 2297, 2315]
    val = source.triplets("val")
    assert all(t.target in t.subset and t.reference in t.subset and len(t.captions) == 1 for t in val)
    assert all(t.target is None for t in source.triplets("test1"))
    with pytest.raises(DataError, match="cap.rc2.train.json"):  # not in shared/: a clear error, not a traceback
        source.triplets("train")


def brute_force_cirr(queries, gallery, names, references, targets, members):
    """CLIP4Cir's CIRR validation, written out: sort every gallery name by distance, remove the reference, find
    the target; the subset ranking is the sorted names restricted to the query's img_set members."""
    distances = 1 - queries @ gallery.T
    recall, subset = [], []
    for i in range(len(queries)):
        order = [names[j] for j in np.argsort(distances[i], kind="stable")]
        order = [n for n in order if n != references[i]]
        recall.append(order.index(targets[i]))
        in_subset = [n for n in order if n in members[i]]
        subset.append(in_subset.index(targets[i]))
    return np.array(recall), np.array(subset)


def test_cirr_metrics_match_a_brute_force_reference():
    """A hand-made case where the reference would rank first: left out, the target moves up; the subset
    ranking only counts the other members of the query's img_set."""
    gallery = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [0.8, 0.3], [-1.0, 0.0]]),
                          dim=-1)
    names = ["ref", "a", "b", "c", "target", "far"]
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.6, 0.8]]), dim=-1)
    references, targets = ["ref", "c"], ["target", "target"]
    members = [["ref", "target", "a", "far"], ["c", "target", "b", "ref"]]
    expected_recall, expected_subset = brute_force_cirr(queries.numpy(), gallery.numpy(), names, references,
                                                        targets, members)
    index = {n: i for i, n in enumerate(names)}
    ranks = target_ranks(queries, gallery, torch.tensor([index[t] for t in targets]),
                         torch.tensor([index[r] for r in references]))
    subsets = subset_ranks(queries, gallery, torch.tensor([index[t] for t in targets]),
                           [[index[m] for m in ms if m != r] for ms, r in zip(members, references, strict=True)])
    np.testing.assert_array_equal(ranks.numpy(), expected_recall)
    np.testing.assert_array_equal(subsets.numpy(), expected_subset)
    # by hand: query 0 ranks ref, a, target, ...: without ref the target is second, and a (a member) is ahead of
    # it in the subset too; query 1 ranks c (its reference), target, b, ...: the target is first in both
    assert ranks.tolist() == [1, 0] and subsets.tolist() == [1, 0]
    with_reference = target_ranks(queries, gallery, torch.tensor([index[t] for t in targets]))
    assert with_reference.tolist() == [2, 1]  # FashionIQ's protocol keeps the reference in the ranking


def test_cirr_evaluation_and_test_server_files_at_the_real_size(real_cirr, tmp_path):
    out = tmp_path / "metrics.json"
    assert evaluate_main(["--data", str(real_cirr), "--model", "cir-tiny", "--quiet", "--workers", "0",
                          "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics["average"]) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"}
    assert metrics["score"] == pytest.approx((metrics["average"]["R@5"] + metrics["average"]["Rs@1"]) / 2)
    # a random encoder on placeholder images: near chance (R@50 of 2,296 candidates, Rs@1 of 5)
    assert metrics["average"]["R@50"] < 10 and 5 < metrics["average"]["Rs@1"] < 40
    folder = tmp_path / "submission"
    assert evaluate_main(["--data", str(real_cirr), "--model", "cir-tiny", "--quiet", "--workers", "0",
                          "--split", "test1", "--predictions", str(folder)]) == 0
    recall = json.loads((folder / "recall_submission.json").read_text())
    subset = json.loads((folder / "recall_subset_submission.json").read_text())
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    queries = {str(e["pairid"]): e for e in json.loads((real_cirr / "cirr/captions/cap.rc2.test1.json").read_text())}
    assert set(recall) == set(subset) == set(queries) and len(queries) == 4148
    for pair, top in recall.items():
        assert len(top) == 50 == len(set(top)) and queries[pair]["reference"] not in top
    for pair, top in subset.items():
        members = set(queries[pair]["img_set"]["members"]) - {queries[pair]["reference"]}
        assert len(top) == 3 and set(top) <= members


def test_both_stages_train_on_cirr(cirr_root, tmp_path):
    assert train_main(["--data", str(cirr_root), "--output", str(tmp_path / "s1"), "--epochs", "1"] + BASE) == 0
    log = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert "Rs@1" in log[0]["average"] and json.loads((tmp_path / "s1" / "params.json").read_text())["dataset"]
    encoder = next((tmp_path / "s1" / "checkpoints").iterdir()) / "model.safetensors"
    assert combiner_main(["--data", str(cirr_root), "--output", str(tmp_path / "s2"), "--epochs", "2",
                          "--clip-checkpoint", str(encoder)] + BASE[2:]) == 0
    log = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "score" in log[-1]


def write_own_triplets(tiny_root: Path, path: Path, fmt: str) -> None:
    """The tiny FashionIQ catalog's train and val triplets as a user would write them."""
    rows = []
    for split in ("train", "val"):
        for category in ("dress", "shirt"):
            for t in json.loads((tiny_root / "captions" / f"cap.{category}.{split}.json").read_text()):
                rows.append({"reference": f"{t['candidate']}.jpg", "caption": t["captions"],
                             "target": t["target"], "category": category, "split": split})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["reference", "caption", "caption2", "target", "category", "split"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "caption": r["caption"][0], "caption2": r["caption"][1]})


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_own_triplets_train_evaluate_and_index(tiny_root, tmp_path, fmt):
    file = tmp_path / f"triplets.{fmt}"
    write_own_triplets(tiny_root, file, fmt)
    args = ["--data", str(file), "--images", str(tiny_root / "images")]
    source = open_source(file, images=str(tiny_root / "images"))
    assert source.splits() == ("train", "val") and source.categories() == ["dress", "shirt"]
    assert len(source.triplets("train")) == 24 and source.protocol.per_category
    assert train_main(args + ["--output", str(tmp_path / "s1"), "--epochs", "1"] + BASE) == 0
    encoder = next((tmp_path / "s1" / "checkpoints").iterdir()) / "model.safetensors"
    assert combiner_main(args + ["--output", str(tmp_path / "s2"), "--epochs", "1", "--clip-checkpoint",
                                 str(encoder)] + BASE[2:]) == 0
    out = tmp_path / "m.json"
    assert evaluate_main(args + ["--clip-checkpoint", str(encoder), "--quiet", "--workers", "0",
                                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"dress", "shirt", "average"} <= set(metrics) and set(metrics["dress"]) == {"R@1", "R@5", "R@10", "R@50"}
    assert build_main(args + ["--clip-checkpoint", str(encoder), "--output", str(tmp_path / "index"),
                              "--quiet", "--workers", "0"]) == 0
    engine = SearchEngine.load(tmp_path / "index", device="cpu")
    triplet = source.triplets("val")[0]
    hits = engine.composed_search("is red", reference_id=triplet.reference, k=5, mode="sum").hits
    assert len(hits) == 5 and triplet.reference not in [h.id for h in hits]


def test_own_triplets_without_splits_hold_out_whole_groups_of_images(tiny_root, tmp_path):
    """About one group of connected images in ten is val, and no val reference or target is a training image."""
    file = tmp_path / "t.jsonl"
    write_own_triplets(tiny_root, file, "jsonl")
    rows = [{k: v for k, v in json.loads(line).items() if k != "split"} for line in file.read_text().splitlines()]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, again = (open_source(file, images=str(tiny_root / "images")) for _ in range(2))
    assert first.splits() == ("train", "val")
    assert [t.reference for t in first.triplets("val")] == [t.reference for t in again.triplets("val")]
    assert 0 < len(first.triplets("val")) < len(rows) // 3
    trained = {i for t in first.triplets("train") for i in (t.reference, t.target)}
    assert not trained & {i for t in first.triplets("val") for i in (t.reference, t.target)}


def test_bad_triplet_files_name_the_line_and_field(tiny_root, tmp_path):
    images = str(tiny_root / "images")
    some = next((tiny_root / "images").iterdir()).name
    cases = [
        (f'{{"reference": "{some}", "caption": "is red"}}', "line 1: field 'target' is missing"),
        (f'{{"reference": "{some}", "target": "{some}"}}', "line 1: field 'caption'"),
        (f'{{"reference": "nope.jpg", "target": "{some}", "caption": "x"}}', "line 1: reference 'nope.jpg' is not"),
        (f'{{"reference": "{some}", "target": "{some}", "caption": "x"}}\n{{oops', "line 2 is not JSON"),
    ]
    for text, message in cases:
        (tmp_path / "t.jsonl").write_text(text)
        with pytest.raises(DataError, match=message):
            open_source(tmp_path / "t.jsonl", images=images)
    (tmp_path / "t.csv").write_text("ref,caption\nx,y\n")
    with pytest.raises(DataError, match=r"t\.csv: the CSV header names neither triplets .*got \[.ref., .caption.\]"):
        open_source(tmp_path / "t.csv", images=images)
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "missing-folder")


def test_cirr_bad_inputs_name_the_file_and_entry(cirr_root, tmp_path):
    root = tmp_path / "cirr"
    shutil.copytree(cirr_root, root)
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(captions.read_text())
    del entries[2]["target_hard"]
    captions.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"cap.rc2.val.json: entry 2 \(pairid \d+\) has no 'target_hard'"):
        open_source(root).triplets("val")
    entries[2]["target_hard"] = "dev-not-listed"
    captions.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="entry 2.*target_hard 'dev-not-listed' is not in split.rc2.val.json"):
        open_source(root).triplets("val")
    (root / "cirr" / "image_splits" / "split.rc2.test1.json").unlink()
    with pytest.raises(DataError, match="split.rc2.test1.json"):
        open_source(root).gallery("test1")
    gone = next((root / "dev").iterdir())
    gone.unlink()
    with pytest.raises(DataError, match=f"miss images.*{gone.stem}"):
        GalleryDataset(open_source(root), "val")


def make_datasets_folder(tiny_root: Path, folder: Path) -> list[str]:
    """A catalog saved with datasets' save_to_disk: image, sku and a ClassLabel category."""
    import datasets
    ids, images, labels = [], [], []
    names = ["dress", "shirt", "toptee"]
    for label, category in enumerate(names):
        for image_id in json.loads((tiny_root / "image_splits" / f"split.{category}.val.json").read_text())[:8]:
            ids.append(image_id)
            images.append(str(tiny_root / "images" / f"{image_id}.jpg"))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "sku": datasets.Value("string"),
                                  "kind": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"image": images, "sku": ids, "kind": labels}, features=features) \
        .save_to_disk(str(folder))
    return ids


def test_index_and_search_a_datasets_folder(tiny_root, tmp_path):
    ids = make_datasets_folder(tiny_root, tmp_path / "catalog")
    args = ["--data", str(tmp_path / "catalog"), "--id-column", "sku", "--category-column", "kind"]
    source = open_source(tmp_path / "catalog", id_column="sku", category_column="kind")
    assert source.kind == "hf" and source.categories() == ["dress", "shirt", "toptee"]
    assert list(source.gallery("train")) == ids and source.gallery("train")[ids[9]] == ("shirt",)
    encoder = tmp_path / "enc.safetensors"
    from clip4cir.models.encoder_file import save_encoder
    save_encoder(create_model("cir-tiny"), encoder)
    assert build_main(args + ["--clip-checkpoint", str(encoder), "--output", str(tmp_path / "index"), "--quiet",
                              "--workers", "0"]) == 0
    engine = SearchEngine.load(tmp_path / "index", device="cpu")
    assert len(engine.index) == 24 and engine.index.categories() == ["dress", "shirt", "toptee"]
    image = Image.open(tiny_root / "images" / f"{ids[3]}.jpg")
    assert engine.image_search(image, k=1).hits[0].id == ids[3]  # the same pixels, read through datasets
    # streamed, as from the Hub: read in order, the same index
    assert build_main(args + ["--clip-checkpoint", str(encoder), "--output", str(tmp_path / "streamed"),
                              "--quiet", "--workers", "0", "--streaming", "--chunk-size", "10"]) == 0
    streamed = SearchEngine.load(tmp_path / "streamed", device="cpu")
    np.testing.assert_allclose(streamed.index.feature(ids[20]), engine.index.feature(ids[20]), rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="no column 'colour'.*image, sku, kind"):
        open_source(tmp_path / "catalog", category_column="colour")


def test_imagefolder_with_metadata(tiny_root, tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    names = sorted(p.name for p in (tiny_root / "images").iterdir())[:6]
    for name in names:
        shutil.copy(tiny_root / "images" / name, folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "label": "top" if i % 2 else "skirt"})
                                                   + "\n" for i, n in enumerate(names)))
    source = open_source(folder, category_column="label")
    assert source.kind == "hf" and len(source.gallery("train")) == 6 and source.categories() == ["skirt", "top"]
    assert source.load_image("train/0").size == Image.open(folder / names[0]).size


def test_a_triplet_dataset_from_the_hub_trains(tiny_root, tmp_path):
    """Rows with reference and target images and a caption (as composed-retrieval data sets on the Hub are)."""
    import datasets
    rows = {"reference": [], "target": [], "caption": []}
    for t in json.loads((tiny_root / "captions" / "cap.dress.train.json").read_text()):
        rows["reference"].append(str(tiny_root / "images" / f"{t['candidate']}.jpg"))
        rows["target"].append(str(tiny_root / "images" / f"{t['target']}.jpg"))
        rows["caption"].append(t["captions"])
    features = datasets.Features({"reference": datasets.Image(), "target": datasets.Image(),
                                  "caption": datasets.Sequence(datasets.Value("string"))})
    data = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": data, "validation": data.select(range(6))}).save_to_disk(str(tmp_path / "hub"))
    source = open_source(tmp_path / "hub")
    assert source.splits() == ("train", "validation") and len(source.triplets("train")) == 12
    dataset = TripletDataset(source, "train", transform=create_model("cir-tiny").transform)
    assert dataset[0]["reference"].shape == (3, 64, 64)
    assert dataset.caption(0).startswith(rows["caption"][0][0].strip(" .").capitalize()[:5])
