"""Labelled images for learning similarity: garments (one label each) seen many times, differently."""
from __future__ import annotations

import csv
import os
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clip4cir.data.sources.fashioniq import CATEGORIES
from clip4cir.data.synthetic.garments import (
    COLOURS,
    PATTERNS,
    SLEEVES,
    SPECIFIC,
    Catalog,
    Item,
    luminance,
    render,
    render_all,
)

IDENTITY_ATTRIBUTES = ("dark", "patterned", "striped", "dotted", "long_sleeves", "sleeveless", "dress", "shirt",
                       "toptee", "first_style")


def _identity_attributes(item: Item) -> list[int]:
    """CelebA-style binary attributes (1 / -1) of a garment, for the attribute-agreement metric."""
    values = [luminance(item.colour) < 100, item.pattern != "plain", item.pattern == "striped",
              item.pattern == "dotted", item.sleeves == "long", item.sleeves == "sleeveless",
              item.category == "dress", item.category == "shirt", item.category == "toptee",
              item.specific == SPECIFIC[item.category][1][0]]
    return [1 if v else -1 for v in values]


def _clutter(image: Image.Image, rng: np.random.Generator, background: int) -> Image.Image:
    """Random shapes in random colours where the background shows (the garment stays in front)."""
    w, h = image.size
    layer = Image.new("RGB", (w, h), (background,) * 3)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.08, 0.3) * w
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    shows = np.abs(np.asarray(image, dtype=np.int16) - background).sum(-1) < 12
    return Image.composite(layer, image, Image.fromarray((shows * 255).astype(np.uint8)))


def _view(args: tuple[Item, int, str, bool]) -> None:
    """One photo of an identity: the garment seen turned, zoomed, lit and placed differently; ``hard`` adds a
    stronger pose change and light with a colour cast, background clutter and an occluding patch."""
    item, seed, path, hard = args
    rng = np.random.default_rng(seed)
    garment = dataclasses_replace(item, dx=float(rng.uniform(-0.1, 0.1)), dy=float(rng.uniform(-0.06, 0.06)),
                                  scale=float(rng.uniform(0.75, 1.0)), background=int(rng.integers(200, 256)))
    image = render(garment, width=64)
    if hard:
        image = _clutter(image, rng, garment.background)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    turn = 45 if hard else 20
    image = image.rotate(float(rng.uniform(-turn, turn)), resample=Image.BICUBIC, fillcolor=(garment.background,) * 3)
    light = rng.uniform(0.45, 1.6, 3) if hard else np.full(3, rng.uniform(0.7, 1.25))  # a colour cast when hard
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * light, 0, 255).astype(np.uint8))
    w, h = image.size
    if hard:  # something in front: a patch over a fifth to a third of the photo
        pw, ph = rng.uniform(0.3, 0.55) * w, rng.uniform(0.3, 0.55) * h
        px, py = rng.uniform(0, w - pw), rng.uniform(0, h - ph)
        ImageDraw.Draw(image).rectangle([px, py, px + pw, py + ph], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    crop = float(rng.uniform(0.7 if hard else 0.8, 1.0))
    left, top = rng.uniform(0, w * (1 - crop)), rng.uniform(0, h * (1 - crop))
    image.crop((int(left), int(top), int(left + w * crop), int(top + h * crop))).save(path, quality=90)


def make_synthetic_identities(out: str | os.PathLike, identities: int = 120, views: int = 8, seed: int = 0,
                              workers: int | None = None, hard: bool = False) -> dict:
    """Labelled images for learning similarity: ``identities`` garments (a label each: a fixed silhouette,
    colour, pattern, sleeves and style) seen ``views`` times under another pose, zoom, light, crop and background
    (``hard``: stronger pose and light changes, clutter and occlusion). Written as ``out/<label>/<n>.jpg`` and
    ``out/labels.csv`` (image, label and ten binary attributes)."""
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
            jobs.append((item, seed * 1_000_003 + len(jobs), str(out / label / f"{n}.jpg"), hard))
            rows.append([f"{label}/{n}.jpg", label] + _identity_attributes(item))
    render_all(jobs, workers, _view)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", *IDENTITY_ATTRIBUTES])
        writer.writerows(rows)
    return {"identities": identities, "images": len(jobs)}
