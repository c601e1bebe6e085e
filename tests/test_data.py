import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip4cir.core.errors import DataError
from clip4cir.data.captions import caption_variants, clean_caption, eval_caption, random_caption_variant
from clip4cir.data.datasets import GalleryDataset, TripletDataset
from clip4cir.data.images import load_image
from clip4cir.data.sources.base import ImageFolder
from clip4cir.data.sources.fashioniq import (
    CATEGORIES,
    SPLITS,
    FashionIQ,
    load_image_split,
    load_triplets,
    parse_categories,
)

REAL_TRIPLETS = {"dress": (5985, 2017, 2024), "shirt": (5988, 2038, 2038), "toptee": (6027, 1961, 2056)}
REAL_IMAGES = {"dress": (11452, 3817, 3818), "shirt": (19036, 6346, 6346), "toptee": (16121, 5373, 5374)}


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("split", SPLITS)
def test_real_annotation_counts(real_annotations, category, split):
    triplets = load_triplets(real_annotations, category, split)
    images = load_image_split(real_annotations, category, split)
    assert len(triplets) == REAL_TRIPLETS[category][SPLITS.index(split)]
    assert len(images) == REAL_IMAGES[category][SPLITS.index(split)]
    if split == "test":
        assert all(t.target is None for t in triplets)
    else:
        assert all(t.target for t in triplets)
        # the standard protocol relies on every val target being in the val gallery
        if split == "val":
            assert {t.target for t in triplets} <= set(images)


def test_real_shirt_and_toptee_overlap(real_annotations):
    total = sum(len(load_image_split(real_annotations, c, s)) for c in CATEGORIES for s in SPLITS)
    distinct = len({i for c in CATEGORIES for s in SPLITS for i in load_image_split(real_annotations, c, s)})
    assert (total, distinct) == (77683, 74381)


def test_real_triplet_dataset_without_images(real_annotations):
    ds = TripletDataset(FashionIQ(real_annotations, "dress,shirt"), "val", check_images=False)
    assert len(ds) == 2017 + 2038
    item = ds[0]
    assert item["caption"] == eval_caption(ds.triplets[0].captions) and " and " in item["caption"]


def test_caption_cleaning_and_variants():
    assert clean_caption("  is red with shorter sleeves. ") == "is red with shorter sleeves"
    assert clean_caption("is the same!?") == "is the same"
    captions = [" is blue.", "has long sleeves "]
    assert caption_variants(captions) == [
        "Is blue and has long sleeves", "Has long sleeves and is blue", "Is blue", "Has long sleeves"]
    assert eval_caption(captions) == caption_variants(captions)[0]
    assert caption_variants(["show three bottles"]) == ["show three bottles"]  # CIRR: one caption, as it is
    assert caption_variants(["is red", "is longer", "has dots"]) == [
        "Is red and is longer and has dots", "Is red", "Is longer", "Has dots"]


def test_random_caption_variants_are_deterministic_and_cover_all_four():
    draws = [random_caption_variant(3, 1, i) for i in range(200)]
    assert draws == [random_caption_variant(3, 1, i) for i in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert draws != [random_caption_variant(3, 2, i) for i in range(200)]


def test_training_captions_change_with_epoch(tiny_root):
    ds = TripletDataset(FashionIQ(tiny_root), "train", randomize_captions=True, seed=0)
    first = [ds.caption(i) for i in range(len(ds))]
    ds.set_epoch(1)
    assert first != [ds.caption(i) for i in range(len(ds))]


def test_triplet_and_gallery_items(tiny_root):
    from clip4cir.models.transforms import Preprocess, build_transform
    transform = build_transform(Preprocess(size=32))
    ds = TripletDataset(FashionIQ(tiny_root), "train", ["dress"], transform=transform)
    item = ds[0]
    assert item["reference"].shape == item["target"].shape == (3, 32, 32)
    assert item["reference_id"] != item["target_id"] and item["category"] == "dress"
    test = TripletDataset(FashionIQ(tiny_root), "test", transform=transform)
    assert "target" not in test[0] and test[0]["target_id"] == ""
    gallery = GalleryDataset(FashionIQ(tiny_root), "val", CATEGORIES, transform=transform)
    image_id, image = gallery[0]
    assert isinstance(image_id, str) and image.shape == (3, 32, 32)
    assert len(gallery) == sum(len(load_image_split(tiny_root, c, "val")) for c in CATEGORIES)


def copy_root(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    return root


def test_missing_images_error_and_skip(tiny_root, tmp_path):
    root = copy_root(tiny_root, tmp_path)
    triplets = load_triplets(root, "dress", "train")
    gone = [triplets[0].reference, triplets[1].target]
    for image_id in gone:
        (root / "images" / f"{image_id}.jpg").unlink()
    with pytest.raises(DataError) as err:
        TripletDataset(FashionIQ(root), "train", ["dress"])
    message = str(err.value)
    assert "train" in message and str(root) in message and gone[0] in message and "skip_missing" in message
    affected = sum(1 for t in triplets if {t.reference, t.target} & set(gone))
    with pytest.warns(UserWarning, match=f"skipped {affected}"):
        ds = TripletDataset(FashionIQ(root), "train", ["dress"], skip_missing=True)
    assert ds.skipped == affected and len(ds) == len(triplets) - affected
    with pytest.raises(DataError, match=gone[0]):
        GalleryDataset(FashionIQ(root), "train", ["dress"])
    with pytest.warns(UserWarning):
        gallery = GalleryDataset(FashionIQ(root), "train", ["dress"], skip_missing=True)
    assert not set(gone) & set(gallery.ids)


def test_corrupt_and_truncated_images_name_the_file(tiny_root, tmp_path):
    root = copy_root(tiny_root, tmp_path)
    image_id = load_image_split(root, "shirt", "val")[0]
    path = root / "images" / f"{image_id}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    gallery = GalleryDataset(FashionIQ(root), "val", ["shirt"], transform=lambda im: im)
    with pytest.raises(DataError, match=str(path)):
        gallery[gallery.ids.index(image_id)]
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=str(path)):
        load_image(path)


def test_extension_resolution(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpeg").write_bytes(b"")
    (tmp_path / "c.jpg").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"")
    index = ImageFolder(tmp_path)
    assert [Path(index.path(i)).name for i in "abc"] == ["a.png", "b.jpeg", "c.jpg"]
    with pytest.raises(DataError, match="'d'"):
        index.path("d")


def test_bad_categories_splits_and_json(tiny_root, tmp_path):
    with pytest.raises(DataError, match="'skirt'"):
        parse_categories("dress,skirt")
    with pytest.raises(DataError, match="'skirt'"):
        load_triplets(tiny_root, "skirt", "train")
    with pytest.raises(DataError, match="'dev'"):
        load_image_split(tiny_root, "dress", "dev")
    root = copy_root(tiny_root, tmp_path)
    bad = root / "captions" / "cap.dress.val.json"
    bad.write_text("[{oops")
    with pytest.raises(DataError, match="cap.dress.val.json"):
        load_triplets(root, "dress", "val")
    bad.write_text(json.dumps([{"candidate": "x", "captions": ["a"]}]))
    with pytest.raises(DataError, match="cap.dress.val.json.*target"):
        load_triplets(root, "dress", "val")
    (root / "image_splits" / "split.toptee.test.json").unlink()
    with pytest.raises(DataError, match="split.toptee.test.json"):
        GalleryDataset(FashionIQ(root), "test", ["toptee"])
    with pytest.raises(DataError, match="does not exist"):
        TripletDataset(FashionIQ(tmp_path / "nowhere"), "train")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(array).convert(mode if mode not in ("I;16",) else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)


def test_huge_image_is_downscaled(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (6000, 300), (10, 200, 30)).save(path)
    image = load_image(path)
    assert max(image.size) <= 4096 and image.getpixel((0, 0)) == (10, 200, 30)
