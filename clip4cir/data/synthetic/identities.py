"""Labelled images for learning similarity: garments (one label each) seen many times, differently."""
from __future__ import annotations

import csv
import os
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
from PIL import Image

from clip4cir.data.sources.fashioniq import CATEGORIES
from clip4cir.data.synthetic.garments import (COLOURS, PATTERNS, SLEEVES, SPECIFIC, Catalog, Item, luminance, render,
                                              render_all)

IDENTITY_ATTRIBUTES = ("dark", "patterned", "striped", "dotted", "long_sleeves", "sleeveless", "dress", "shirt",
                       "toptee", "first_style")


def _identity_attributes(item: Item) -> list[int]:
    """CelebA-style binary attributes (1 / -1) of a garment, for the attribute-agreement metric."""
    values = [luminance(item.colour) < 100, item.pattern != "plain", item.pattern == "striped",
              item.pattern == "dotted", item.sleeves == "long", item.sleeves == "sleeveless",
              item.category == "dress", item.category == "shirt", item.category == "toptee",
              item.specific == SPECIFIC[item.category][1][0]]
    return [1 if v else -1 for v in values]


def _view(args: tuple[Item, int, str]) -> None:
    """One photo of an identity: the garment seen turned, zoomed, lit and placed differently."""
    item, seed, path = args
    rng = np.random.default_rng(seed)
    garment = dataclasses_replace(item, dx=float(rng.uniform(-0.1, 0.1)), dy=float(rng.uniform(-0.06, 0.06)),
                                  scale=float(rng.uniform(0.75, 1.0)), background=int(rng.integers(200, 256)))
    image = render(garment, width=64)
    image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, fillcolor=(garment.background,) * 3)
    light = float(rng.uniform(0.7, 1.25))
    image = Image.eval(image, lambda v: min(255, int(v * light)))
    w, h = image.size
    crop = float(rng.uniform(0.8, 1.0))
    left, top = rng.uniform(0, w * (1 - crop)), rng.uniform(0, h * (1 - crop))
    image.crop((int(left), int(top), int(left + w * crop), int(top + h * crop))).save(path, quality=90)


def make_synthetic_identities(out: str | os.PathLike, identities: int = 120, views: int = 8, seed: int = 0,
                              workers: int | None = None) -> dict:
    """Labelled images for learning similarity: ``identities`` garments (a label each: a fixed silhouette,
    colour, pattern, sleeves and style) seen ``views`` times under another pose, zoom, light, crop and background.
    Written as ``out/<label>/<n>.jpg`` and ``out/labels.csv`` (image, label and ten binary attributes)."""
    most = len(CATEGORIES) * len(COLOURS) * len(PATTERNS) * len(SLEEVES) * 3
    if not 2 <= identities <= most or views < 2:
        raise ValueError(f"identities must be 2..{most} and views at least 2, got {identities} and {views}")
    out = Path(out)
    catalog = Catalog(seed)
    seen, jobs, rows = set(), [], []
    while len(seen) < identities:
        category = str(catalog.rng.choice(CATEGORIES))
        item = catalog.item(category)
        key = (category, item.colour, item.pattern, item.sleeves, item.specific)
        if key in seen:
            continue
        seen.add(key)
        label = f"id{len(seen):04d}"
        (out / label).mkdir(parents=True, exist_ok=True)
        for n in range(views):
            jobs.append((item, seed * 1_000_003 + len(jobs), str(out / label / f"{n}.jpg")))
            rows.append([f"{label}/{n}.jpg", label] + _identity_attributes(item))
    render_all(jobs, workers, _view)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", *IDENTITY_ATTRIBUTES])
        writer.writerows(rows)
    return {"identities": identities, "images": len(jobs)}
