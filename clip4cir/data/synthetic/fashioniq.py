"""A synthetic catalog in FashionIQ's exact layout, for tests, the offline demo and benchmarks.

Each triplet's target differs from its reference in one to three attributes, described by two FashionIQ-style
captions; galleries hold hard distractors that differ from a target in one attribute. The attributes of every
image are written to ``synthetic_attributes.json`` beside the FashionIQ folders, and a shop's title of each to
``pairs.jsonl`` (image-text pairs, each image in its FashionIQ split).
"""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.data.sources.fashioniq import CATEGORIES, SPLITS
from clip4cir.data.synthetic.garments import (
    IMAGE_WIDTH,
    Catalog,
    Item,
    attrs_of,
    captions_for,
    render_all,
    write_json,
    write_pairs,
)

# (triplets, images) per split (train, val, test) and category; "full" is FashionIQ's real sizes
SIZES = {
    "tiny": {c: {"train": (12, 30), "val": (8, 24), "test": (4, 12)} for c in CATEGORIES},
    # enough titles per category to tell which words replace which (mining triplets from them), in a minute
    "small": {c: {"train": (100, 300), "val": (60, 150), "test": (4, 12)} for c in CATEGORIES},
    "demo": {c: {"train": (400, 1000), "val": (150, 400), "test": (50, 130)} for c in CATEGORIES},
    # a held-out catalog for benchmarks: a val split four times the demo's (1,800 queries), little else
    "heldout": {c: {"train": (12, 30), "val": (600, 1600), "test": (4, 12)} for c in CATEGORIES},
    "full": {
        "dress": {"train": (5985, 11452), "val": (2017, 3817), "test": (2024, 3818)},
        "shirt": {"train": (5988, 19036), "val": (2038, 6346), "test": (2038, 6346)},
        "toptee": {"train": (6027, 16121), "val": (1961, 5373), "test": (2056, 5374)},
    },
}
def generate_split(catalog: Catalog, category: str, n_triplets: int, n_images: int
                   ) -> tuple[list[Item], list[dict]]:
    """The images and triplets of one (category, split): references, targets, hard distractors, random fill."""
    rng, items, triplets = catalog.rng, [], []
    hard_negatives: list[Item] = []
    if n_images < n_triplets + 1:
        raise ValueError(f"{category}: {n_images} images cannot hold {n_triplets} triplets")
    for t in range(n_triplets):
        # free places once this triplet's target and every later target have theirs
        room = n_images - len(items) - len(hard_negatives) - (n_triplets - t)
        if items and (rng.random() < 0.3 or room < 1):
            reference = items[int(rng.integers(len(items)))]
        else:
            reference = catalog.item(category)
            items.append(reference)
            room -= 1
        n_changes = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        target_attrs, changes = catalog.changed(category, attrs_of(reference), n_changes)
        target = catalog.item(category, target_attrs)
        items.append(target)
        triplets.append({"target": target.id, "candidate": reference.id,
                         "captions": captions_for(rng, category, changes)})
        if room >= 1:  # a hard distractor: the target with one attribute changed
            hard_negatives.append(catalog.item(category, catalog.changed(category, target_attrs, 1)[0]))
    items += hard_negatives
    while len(items) < n_images:
        items.append(catalog.item(category))
    order = rng.permutation(len(items))
    return [items[i] for i in order], triplets


def make_synthetic_fashioniq(out: str | os.PathLike, size: str = "tiny", seed: int = 0, workers: int | None = None,
                             width: int = IMAGE_WIDTH, splits: tuple[str, ...] = SPLITS) -> dict:
    """Write a synthetic FashionIQ-layout catalog under ``out``: the ``splits`` of it (the others are drawn but
    not written, so a split is the same whichever are asked for), photos ``width`` pixels wide (what the app
    shows; the model's input size is independent). Returns its counts per category and split."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    catalog = Catalog(seed)
    all_items: dict[str, Item] = {}
    split_of: dict[str, str] = {}
    counts: dict = {}
    for category in CATEGORIES:
        for split in SPLITS:
            n_triplets, n_images = SIZES[size][category][split]
            items, triplets = generate_split(catalog, category, n_triplets, n_images)
            if split not in splits:
                continue
            if split == "test":
                triplets = [{"candidate": t["candidate"], "captions": t["captions"]} for t in triplets]
            write_json(out / "captions" / f"cap.{category}.{split}.json", triplets)
            write_json(out / "image_splits" / f"split.{category}.{split}.json", [i.id for i in items])
            all_items.update({i.id: i for i in items})
            split_of.update({i.id: split for i in items})
            counts[f"{category}.{split}"] = {"triplets": len(triplets), "images": len(items)}
    render_all([(item, str(out / "images" / f"{item.id}.jpg"), width) for item in all_items.values()], workers)
    write_json(out / "synthetic_attributes.json", {i.id: i.attributes() for i in all_items.values()})
    # one split drawn (the demo's catalog): no split column, so image-text training holds images out by their ids
    write_pairs(out / "pairs.jsonl", [(i, f"images/{i.id}.jpg", split_of[i.id] if len(splits) > 1 else None)
                                      for i in all_items.values()])
    return counts
