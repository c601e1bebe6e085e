"""A synthetic data set in CIRCO's layout (clip4cir.data.sources.circo): a gallery of product photos under
COCO-style 12-digit ids, and queries with several ground truths each: the target and the other photos of an item
with the target's attributes (a few drawn on purpose, and any gallery photo that happens to match), so mAP@K has
something to count. Semantic aspects name the kind of change (one change, or several joined)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from clip4cir.data.sources.circo import IMAGE_INFO, IMAGES
from clip4cir.data.sources.fashioniq import CATEGORIES
from clip4cir.data.synthetic.garments import (
    IMAGE_WIDTH,
    Catalog,
    Item,
    attrs_of,
    captions_for,
    render_all,
    title,
    write_json,
)

# (gallery photos, val queries, test queries); "full" is CIRCO's query counts over a smaller gallery
CIRCO_SIZES = {"tiny": (240, 24, 12), "demo": (3_000, 220, 100), "full": (20_000, 220, 800)}
EXTRA_TRUTHS = (1, 4)  # other photos of the target's attributes drawn per query (at least, at most)


def _query(catalog: Catalog, gallery: list[Item], n: int) -> tuple[dict, list[Item]]:
    """One query over the gallery: a reference from it, one or two changes, the target and its look-alikes
    (returned, to be added to the gallery); its ground truths are filled in once the gallery is complete."""
    rng = catalog.rng
    reference = gallery[int(rng.integers(len(gallery)))]
    n_changes = int(rng.choice([1, 2], p=[0.6, 0.4]))
    attrs, changes = catalog.changed(reference.category, attrs_of(reference), n_changes)
    fits = [catalog.item(reference.category, attrs)
            for _ in range(1 + int(rng.integers(EXTRA_TRUTHS[0], EXTRA_TRUTHS[1] + 1)))]
    entry = {"id": n, "reference_img_id": reference.id, "target_img_id": fits[0].id,
             "relative_caption": captions_for(rng, reference.category, changes)[0],
             "shared_concept": f"a {reference.category}",
             "semantic_aspects": ["compare_change"] if n_changes == 1 else ["statement_with_conjunction",
                                                                             "compare_change"]}
    return entry, fits


def make_synthetic_circo(out: str | os.PathLike, size: str = "tiny", seed: int = 0, workers: int | None = None,
                         width: int = IMAGE_WIDTH) -> dict:
    """Write a CIRCO-layout data set of ``CIRCO_SIZES[size]`` under ``out``; returns its counts."""
    out = Path(out)
    n_gallery, n_val, n_test = CIRCO_SIZES[size]
    catalog = Catalog(seed)
    numbers = iter(catalog.rng.permutation(10 ** 6)[:n_gallery * 2] + 10 ** 5)
    catalog.new_id = lambda: str(int(next(numbers)))  # COCO-style numeric ids
    gallery = [catalog.item(CATEGORIES[n % len(CATEGORIES)]) for n in range(n_gallery - (n_val + n_test) * 3)]
    queries = {}
    for split, count in (("val", n_val), ("test", n_test)):
        queries[split] = []
        for _ in range(count):
            entry, fits = _query(catalog, gallery, len(queries[split]))  # ids from 0 in each split, as CIRCO's
            queries[split].append((entry, fits))
            gallery += fits
    by_look: dict[tuple, list[str]] = {}
    for item in gallery:
        by_look.setdefault((item.category, *attrs_of(item).values()), []).append(item.id)
    for split, rows in queries.items():
        entries = []
        for entry, fits in rows:
            look = (fits[0].category, *attrs_of(fits[0]).values())
            truths = [fits[0].id] + [i for i in by_look[look] if i != fits[0].id]
            if split == "val":
                entries.append({**entry, "gt_img_ids": [int(i) for i in truths],
                                "reference_img_id": int(entry["reference_img_id"]),
                                "target_img_id": int(entry["target_img_id"])})
            else:
                entries.append({k: int(v) if k == "reference_img_id" else v for k, v in entry.items()
                                if k in ("id", "reference_img_id", "relative_caption", "shared_concept")})
        write_json(out / "annotations" / f"{split}.json", entries)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    render_all([(item, str(out / IMAGES / f"{int(item.id):012d}.jpg"), width) for item in gallery], workers)
    write_json(out / IMAGE_INFO, {"images": [{"id": int(item.id), "file_name": f"{int(item.id):012d}.jpg"}
                                             for item in gallery]})
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for item in gallery:
            f.write(json.dumps({"image": f"{IMAGES.as_posix()}/{int(item.id):012d}.jpg", "text": title(item)}) + "\n")
    return {"images": len(gallery), "val": len(queries["val"]), "test": len(queries["test"]),
            "ground_truths_per_val_query": round(sum(len(by_look[(f[0].category, *attrs_of(f[0]).values())])
                                                     for _, f in queries["val"]) / max(len(queries["val"]), 1), 2)}
