import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from clip4cir.data.datasets import GalleryDataset, TripletDataset
from clip4cir.data.sources.fashioniq import CATEGORIES, SPLITS, FashionIQ, load_image_split, load_triplets
from clip4cir.data.synthetic import SIZES, make_synthetic_fashioniq
from clip4cir.data.synthetic.garments import ATTRIBUTES, SPECIFIC, Item, render


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_counts(tiny_root):
    for category in CATEGORIES:
        for split in SPLITS:
            assert (tiny_root / "captions" / f"cap.{category}.{split}.json").is_file()
            assert (tiny_root / "image_splits" / f"split.{category}.{split}.json").is_file()
            n_triplets, n_images = SIZES["tiny"][category][split]
            assert len(load_triplets(tiny_root, category, split)) == n_triplets
            assert len(load_image_split(tiny_root, category, split)) == n_images
    # the standard loaders read it like the real data set, images included
    assert len(TripletDataset(FashionIQ(tiny_root), "val")) == sum(SIZES["tiny"][c]["val"][0] for c in CATEGORIES)
    assert len(GalleryDataset(FashionIQ(tiny_root), "test")) > 0
    assert all(len(p.stem) == 10 and p.stem.startswith("B0") for p in (tiny_root / "images").iterdir())


def test_deterministic_for_a_seed(tiny_root, tmp_path):
    make_synthetic_fashioniq(tmp_path / "again", "tiny", seed=0, workers=1)
    assert digest(tmp_path / "again") == digest(tiny_root)
    make_synthetic_fashioniq(tmp_path / "other", "tiny", seed=1, workers=1)
    assert digest(tmp_path / "other") != digest(tiny_root)


def test_one_split_drawn_larger_is_the_same_split(tiny_root, tmp_path):
    """The demo's catalog: the val split alone, drawn at 192 px, holds the same items and triplets as the val
    split of the whole catalog, and the same garments (the small images match the large ones shrunk)."""
    make_synthetic_fashioniq(tmp_path, "tiny", seed=0, workers=1, width=192, splits=("val",))
    assert sorted(p.name for p in (tmp_path / "captions").iterdir()) == [f"cap.{c}.val.json" for c in CATEGORIES]
    for category in CATEGORIES:
        for folder, name in (("captions", "cap"), ("image_splits", "split")):
            file = f"{folder}/{name}.{category}.val.json"
            assert (tmp_path / file).read_text() == (tiny_root / file).read_text()
    ids = json.loads((tmp_path / "image_splits" / "split.dress.val.json").read_text())[:8]
    large = [Image.open(tmp_path / "images" / f"{i}.jpg").convert("RGB") for i in ids]
    small = [Image.open(tiny_root / "images" / f"{i}.jpg").convert("RGB") for i in ids]
    assert all(image.width == 192 for image in large) and all(image.width < 192 for image in small)
    for one, shown in enumerate(large):  # each large photo, shrunk, is closest to its own small one
        gaps = [np.abs(np.asarray(shown.resize(s.size), dtype=float) - np.asarray(s, dtype=float)).mean()
                for s in small]
        assert int(np.argmin(gaps)) == one, gaps


def test_targets_differ_in_one_to_three_attributes_and_galleries_hold_them(tiny_root):
    attributes = json.loads((tiny_root / "synthetic_attributes.json").read_text())
    for category in CATEGORIES:
        for split in ("train", "val"):
            gallery = set(load_image_split(tiny_root, category, split))
            for t in load_triplets(tiny_root, category, split):
                ref, tgt = attributes[t.reference], attributes[t.target]
                assert ref["category"] == tgt["category"] == category
                assert 1 <= sum(ref[a] != tgt[a] for a in ref) <= 3
                assert {t.reference, t.target} <= gallery and all(c.strip() for c in t.captions)


def test_gallery_has_distractors_sharing_target_attributes(tiny_root):
    attributes = json.loads((tiny_root / "synthetic_attributes.json").read_text())
    val = load_image_split(tiny_root, "dress", "val")
    near = 0
    for t in load_triplets(tiny_root, "dress", "val"):
        target = attributes[t.target]
        near += any(i != t.target and sum(attributes[i][a] != target[a] for a in target) == 1 for i in val)
    assert near >= len(load_triplets(tiny_root, "dress", "val")) // 2


def test_images_are_product_photo_shaped_and_vary(tiny_root):
    sizes = {Image.open(p).size for p in list((tiny_root / "images").iterdir())[:50]}
    assert all(1.28 <= h / w <= 1.62 for w, h in sizes) and len(sizes) > 3


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_every_attribute_a_caption_names_is_visible(category, attribute):
    """Two photos that differ only in one attribute differ in their pixels: what a caption says can be seen."""
    base = Item("B0", category, "red", "plain", "short", SPECIFIC[category][1][0], 1.4, 0.0, 0.0, 0.9, 240)
    other = {"colour": "blue", "pattern": "striped", "sleeves": "long", "specific": SPECIFIC[category][1][1]}
    changed = dataclasses.replace(base, **{attribute: other[attribute]})
    a, b = (np.asarray(render(item), dtype=np.int16) for item in (base, changed))
    assert np.abs(a - b).max() > 60 and (np.abs(a - b).max(axis=2) > 60).mean() > 0.002
