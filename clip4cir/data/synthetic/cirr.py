"""A synthetic catalog in CIRR's exact layout (``cirr/captions``, ``cirr/image_splits``, the images at the paths
the split files give), each query with its image subset; a title of each image in ``pairs.jsonl``."""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.data.sources.fashioniq import CATEGORIES
from clip4cir.data.synthetic.garments import (
    ATTRIBUTES,
    IMAGE_WIDTH,
    Catalog,
    Item,
    attrs_of,
    phrases,
    render_all,
    write_json,
    write_pairs,
)

# (triplets, images) per CIRR split; "full" is CIRR's real sizes (train captions: about 28k)
CIRR_SIZES = {
    "tiny": {"train": (40, 60), "val": (30, 48), "test1": (12, 24)},
    "demo": {"train": (1200, 900), "val": (360, 240), "test1": (120, 96)},
    "full": {"train": (28225, 16939), "val": (4181, 2297), "test1": (4148, 2315)},
}
CIRR_FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}
SET_SIZE = 6  # a CIRR image subset: the reference, the target and visually similar images


def _cirr_split(catalog: Catalog, split: str, n_triplets: int, n_images: int, first_pair: int
                ) -> tuple[dict[str, tuple[Item, str]], list[dict]]:
    """Image subsets of six similar garments (one garment and five with one or two attributes changed), and
    triplets within them whose caption says what changes; names and paths as CIRR has them."""
    rng, prefix = catalog.rng, CIRR_FOLDERS[split]
    images: dict[str, tuple[Item, str]] = {}
    sets = []
    for s in range(n_images // SET_SIZE):
        category = str(rng.choice(CATEGORIES))
        base = catalog.item(category)
        members = [base] + [catalog.item(category, catalog.changed(category, attrs_of(base),
                                                                   int(rng.integers(1, 3)))[0])
                            for _ in range(SET_SIZE - 1)]
        names = [f"{prefix}-{s}-{j // 2}-img{j % 2}" for j in range(SET_SIZE)]
        folder = f"./{prefix}/{s % 100}" if split == "train" else f"./{prefix}"
        images.update({name: (item, f"{folder}/{name}.png") for name, item in zip(names, members, strict=True)})
        sets.append((category, members, names))
    for extra in range(n_images - len(images)):  # images in no subset
        name = f"{prefix}-extra-{extra}-img0"
        images[name] = (catalog.item(str(rng.choice(CATEGORIES))), f"./{prefix}/{name}.png")
    triplets = []
    for t in range(n_triplets):
        s = t % len(sets)
        category, members, names = sets[s]
        while True:
            r, g = (int(i) for i in rng.choice(SET_SIZE, 2, replace=False))
            changes = [(a, attrs_of(members[r])[a], attrs_of(members[g])[a]) for a in ATTRIBUTES
                       if attrs_of(members[r])[a] != attrs_of(members[g])[a]]
            if changes:
                break
        caption = " and ".join(str(rng.choice(phrases(category, *change))) for change in changes)
        entry = {"pairid": first_pair + t, "reference": names[r], "target_hard": names[g],
                 "target_soft": {names[g]: 1.0}, "caption": caption,
                 "img_set": {"id": s, "members": names, "reference_rank": r, "target_rank": g}}
        if split == "test1":
            entry = {k: v for k, v in entry.items() if k not in ("target_hard", "target_soft")}
            entry["img_set"] = {k: v for k, v in entry["img_set"].items() if k != "target_rank"}
        triplets.append(entry)
    return images, triplets


def make_synthetic_cirr(out: str | os.PathLike, size: str = "tiny", seed: int = 0, workers: int | None = None) -> dict:
    """Write a synthetic catalog in CIRR's layout under ``out`` (``cirr/captions``, ``cirr/image_splits``, the
    images at the paths the split files give); returns its counts per split."""
    if size not in CIRR_SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(CIRR_SIZES)}")
    out = Path(out)
    catalog = Catalog(seed)
    jobs, counts, pair, titled = [], {}, 0, []
    for split, (n_triplets, n_images) in CIRR_SIZES[size].items():
        images, triplets = _cirr_split(catalog, split, n_triplets, n_images, pair)
        pair += len(triplets)
        write_json(out / "cirr" / "captions" / f"cap.rc2.{split}.json", triplets)
        write_json(out / "cirr" / "image_splits" / f"split.rc2.{split}.json",
                    {name: path for name, (_, path) in images.items()})
        for item, path in images.values():
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            jobs.append((item, str(out / path), IMAGE_WIDTH))
            titled.append((item, path.removeprefix("./"), "val" if split == "val" else "test" if split == "test1"
                           else "train"))
        counts[split] = {"triplets": len(triplets), "images": len(images)}
    render_all(jobs, workers)
    write_pairs(out / "pairs.jsonl", titled)
    return counts
