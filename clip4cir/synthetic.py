"""A synthetic catalog in FashionIQ's exact layout, for tests, the offline demo and benchmarks.

Garments are drawn with visible attributes (silhouette, colour, pattern, sleeves and one category-specific
attribute); each triplet's target differs from its reference in one to three attributes, described by two
FashionIQ-style captions; galleries hold hard distractors that differ from a target in one attribute.
The attributes of every image are written to ``synthetic_attributes.json`` beside the FashionIQ folders.
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .sources.fashioniq import CATEGORIES, SPLITS

COLOURS = {
    "red": (200, 30, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (235, 205, 40),
    "black": (25, 25, 25), "white": (245, 245, 245), "pink": (245, 140, 185), "purple": (120, 50, 150),
    "orange": (240, 130, 30), "grey": (128, 128, 128),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
SLEEVES = ("sleeveless", "short", "long")  # ordered from shortest
SPECIFIC = {  # the category-specific attribute and its values
    "dress": ("length", ("mini", "knee", "maxi")),
    "shirt": ("neckline", ("round", "v-neck", "collar")),
    "toptee": ("print", ("none", "star", "heart")),
}
ATTRIBUTES = ("colour", "pattern", "sleeves", "specific")
# (triplets, images) per split (train, val, test) and category; "full" is FashionIQ's real sizes
SIZES = {
    "tiny": {c: {"train": (12, 30), "val": (8, 24), "test": (4, 12)} for c in CATEGORIES},
    "demo": {c: {"train": (400, 1000), "val": (150, 400), "test": (50, 130)} for c in CATEGORIES},
    "full": {
        "dress": {"train": (5985, 11452), "val": (2017, 3817), "test": (2024, 3818)},
        "shirt": {"train": (5988, 19036), "val": (2038, 6346), "test": (2038, 6346)},
        "toptee": {"train": (6027, 16121), "val": (1961, 5373), "test": (2056, 5374)},
    },
}
IMAGE_WIDTH = 72


@dataclass(frozen=True)
class Item:
    """One catalog image: its id, category, attributes and the small random variations of its photo."""

    id: str
    category: str
    colour: str
    pattern: str
    sleeves: str
    specific: str
    aspect: float
    dx: float
    dy: float
    scale: float
    background: int

    def attributes(self) -> dict:
        return {"category": self.category, "colour": self.colour, "pattern": self.pattern,
                "sleeves": self.sleeves, SPECIFIC[self.category][0]: self.specific}


def _values(category: str, attribute: str) -> tuple[str, ...]:
    return {"colour": tuple(COLOURS), "pattern": PATTERNS, "sleeves": SLEEVES,
            "specific": SPECIFIC[category][1]}[attribute]


def _luminance(colour: str) -> float:
    r, g, b = COLOURS[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _phrases(category: str, attribute: str, old: str, new: str) -> list[str]:
    """Ways a shopper says that ``attribute`` changes from ``old`` to ``new``."""
    if attribute == "colour":
        out = [f"is {new} instead of {old}", f"is {new}", f"is {new} colored", f"is a {new} one"]
        delta = _luminance(new) - _luminance(old)
        if abs(delta) > 60:
            out.append("is darker" if delta < 0 else "is lighter")
        return out
    if attribute == "pattern":
        return {"plain": ["is plain", "is solid colored", "has no pattern"],
                "striped": ["is striped", "has stripes"],
                "dotted": ["has polka dots", "is dotted"],
                "checked": ["is checkered", "has a plaid pattern"]}[new]
    if attribute == "sleeves":
        longer = SLEEVES.index(new) > SLEEVES.index(old)
        return {"sleeveless": ["is sleeveless", "has no sleeves"],
                "short": ["has short sleeves"], "long": ["has long sleeves"]}[new] + \
            ["has longer sleeves" if longer else "has shorter sleeves"]
    name, values = SPECIFIC[category]
    if name == "length":
        longer = values.index(new) > values.index(old)
        return [{"mini": "is a mini dress", "knee": "is knee length", "maxi": "is a maxi dress"}[new],
                "is longer" if longer else "is shorter"]
    if name == "neckline":
        return {"round": ["has a round neck", "has a crew neck"], "v-neck": ["has a v-neck", "has a v neckline"],
                "collar": ["has a collar", "is collared"]}[new]
    return {"none": ["has no print", "has no graphic"], "star": ["has a star print", "has a star graphic"],
            "heart": ["has a heart print", "has a heart on it"]}[new]


def _captions(rng: np.random.Generator, category: str, changes: list[tuple[str, str, str]]) -> list[str]:
    """Two captions that together mention every change; each may mention a different subset."""
    n = len(changes)
    first = rng.permutation(n)[: rng.integers(1, n + 1)]
    rest = [i for i in range(n) if i not in set(first)]
    if rest:  # the second caption names what the first left out, and sometimes repeats some of it
        second = rest + [i for i in first if rng.random() < 0.3]
    else:
        second = list(rng.permutation(n)[: rng.integers(1, n + 1)])
    captions = []
    for subset in (first, second):
        phrases = [rng.choice(_phrases(category, *changes[i])) for i in sorted(subset)]
        text = " and ".join(str(p) for p in phrases)
        text = (" " if rng.random() < 0.1 else "") + text + ("." if rng.random() < 0.15 else "")
        captions.append(text)
    return captions


class _Catalog:
    """Draws items and ids from one random stream, so a seed decides everything."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.ids: set[str] = set()

    def new_id(self) -> str:
        alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
        while True:
            image_id = "B0" + "".join(self.rng.choice(alphabet, 8))
            if image_id not in self.ids:
                self.ids.add(image_id)
                return image_id

    def item(self, category: str, attrs: dict | None = None) -> Item:
        rng = self.rng
        attrs = attrs or {a: str(rng.choice(_values(category, a))) for a in ATTRIBUTES}
        return Item(self.new_id(), category, attrs["colour"], attrs["pattern"], attrs["sleeves"], attrs["specific"],
                    aspect=float(rng.uniform(1.3, 1.6)), dx=float(rng.uniform(-0.06, 0.06)),
                    dy=float(rng.uniform(-0.04, 0.04)), scale=float(rng.uniform(0.82, 1.0)),
                    background=int(rng.integers(225, 256)))

    def changed(self, category: str, attrs: dict, n_changes: int) -> tuple[dict, list[tuple[str, str, str]]]:
        new, changes = dict(attrs), []
        for attribute in self.rng.permutation(ATTRIBUTES)[:n_changes]:
            attribute = str(attribute)
            value = str(self.rng.choice([v for v in _values(category, attribute) if v != attrs[attribute]]))
            new[attribute] = value
            changes.append((attribute, attrs[attribute], value))
        return new, changes


def _attrs(item: Item) -> dict:
    return {"colour": item.colour, "pattern": item.pattern, "sleeves": item.sleeves, "specific": item.specific}


def generate_split(catalog: _Catalog, category: str, n_triplets: int, n_images: int
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
        target_attrs, changes = catalog.changed(category, _attrs(reference), n_changes)
        target = catalog.item(category, target_attrs)
        items.append(target)
        triplets.append({"target": target.id, "candidate": reference.id,
                         "captions": _captions(rng, category, changes)})
        if room >= 1:  # a hard distractor: the target with one attribute changed
            hard_negatives.append(catalog.item(category, catalog.changed(category, target_attrs, 1)[0]))
    items += hard_negatives
    while len(items) < n_images:
        items.append(catalog.item(category))
    order = rng.permutation(len(items))
    return [items[i] for i in order], triplets


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, ...]:
    """Lighter (amount > 0) or darker (amount < 0) version of a colour."""
    return tuple(int(c + (255 - c) * amount) if amount > 0 else int(c * (1 + amount)) for c in rgb)


def render(item: Item, width: int = IMAGE_WIDTH) -> Image.Image:
    """Draw the product photo of an item: a garment on a plain background, slightly shifted and scaled."""
    height = int(round(width * item.aspect))
    ss = 2  # draw at twice the size, then downsample, for smooth edges
    W, H = width * ss, height * ss
    image = Image.new("RGB", (W, H), (item.background,) * 3)
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    gw = W * 0.78 * item.scale
    gh = min(H * 0.9, gw * 1.45) * item.scale
    x0 = (W - gw) / 2 + item.dx * W
    y0 = (H - gh) / 2 + item.dy * H

    def p(u: float, v: float) -> tuple[float, float]:
        return x0 + u * gw, y0 + v * gh

    dress = item.category == "dress"
    bottom = {"mini": 0.55, "knee": 0.75, "maxi": 0.98}[item.specific] if dress else \
        (0.85 if item.category == "shirt" else 0.68)
    if dress:  # bodice then a flared skirt
        body = [p(0.33, 0.08), p(0.67, 0.08), p(0.66, 0.38), p(0.5 + 0.12 + 0.3 * bottom, bottom),
                p(0.5 - 0.12 - 0.3 * bottom, bottom), p(0.34, 0.38)]
    else:
        half = 0.25 if item.category == "shirt" else 0.27
        body = [p(0.5 - half, 0.1), p(0.5 + half, 0.1), p(0.5 + half, bottom), p(0.5 - half, bottom)]
    draw.polygon(body, fill=255)
    shoulder = 0.33 if dress else (0.25 if item.category == "shirt" else 0.27)
    if item.sleeves != "sleeveless":
        length = 0.22 if item.sleeves == "short" else 0.55
        for side in (-1, 1):
            sx = 0.5 + side * shoulder
            draw.polygon([p(sx, 0.1), p(sx + side * 0.02, 0.26), p(sx + side * 0.16, 0.1 + length),
                          p(sx + side * 0.24, 0.1 + length - 0.06), p(sx + side * 0.05, 0.08)], fill=255)
    elif dress:  # straps
        for side in (-1, 1):
            draw.rectangle([p(0.5 + side * 0.12 - 0.025, 0.0), p(0.5 + side * 0.12 + 0.025, 0.1)], fill=255)
    base = COLOURS[item.colour]
    accent = _shade(base, 0.55) if _luminance(item.colour) < 100 else _shade(base, -0.45)
    fabric = Image.new("RGB", (W, H), base)
    fd = ImageDraw.Draw(fabric)
    step = max(4, int(gw / 9))
    if item.pattern == "striped":
        for y in range(0, H, step):
            fd.rectangle([0, y, W, y + step // 2 - 1], fill=accent)
    elif item.pattern == "dotted":
        for y in range(step // 2, H, step):
            for x in range((y // step % 2) * step // 2, W, step):
                fd.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=accent)
    elif item.pattern == "checked":
        for x in range(0, W, 2 * step):
            fd.rectangle([x, 0, x + step - 1, H], fill=accent)
        check = Image.new("L", (W, H), 0)
        cd = ImageDraw.Draw(check)
        for y in range(0, H, 2 * step):
            cd.rectangle([0, y, W, y + step - 1], fill=120)
        fabric = Image.composite(Image.new("RGB", (W, H), accent), fabric, check)
        fd = ImageDraw.Draw(fabric)
    image.paste(fabric, (0, 0), mask)
    d = ImageDraw.Draw(image)
    outline = _shade(base, -0.5) if item.colour != "black" else (90, 90, 90)
    d.polygon(body, outline=outline, width=ss)
    neck_bg = (item.background,) * 3
    if item.category == "shirt" and item.specific == "v-neck":
        d.polygon([p(0.42, 0.1), p(0.58, 0.1), p(0.5, 0.25)], fill=neck_bg)
    elif item.category == "shirt" and item.specific == "collar":
        collar = (250, 250, 250) if item.colour != "white" else (40, 40, 40)
        d.polygon([p(0.40, 0.08), p(0.5, 0.14), p(0.45, 0.22)], fill=collar)
        d.polygon([p(0.60, 0.08), p(0.5, 0.14), p(0.55, 0.22)], fill=collar)
        for v in (0.3, 0.45, 0.6, 0.75):
            d.ellipse([p(0.49, v), p(0.51, v + 0.015)], fill=collar)
    else:
        d.ellipse([p(0.42, 0.05), p(0.58, 0.15)], fill=neck_bg)
    if item.category == "toptee" and item.specific != "none":
        graphic = (250, 250, 250) if _luminance(item.colour) < 140 else (20, 20, 20)
        cx, cy = p(0.5, 0.38)
        r = gw * 0.13
        if item.specific == "star":
            angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
            radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
            d.polygon([(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(radii, angles)], fill=graphic)
        else:
            d.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.1], fill=graphic)
            d.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.1], fill=graphic)
            d.polygon([(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=graphic)
    return image.resize((width, height), Image.LANCZOS)


def _render_to(args: tuple[Item, str]) -> None:
    item, path = args
    render(item).save(path, quality=90)


def _render_all(jobs: list, workers: int | None, draw=None) -> None:
    """Run every drawing job (``draw(job)``, default an (item, file) photo), in worker processes when there are
    many."""
    draw = draw or _render_to
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 200:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(draw, jobs, chunksize=64))
    else:
        for job in jobs:
            draw(job)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def make_synthetic_fashioniq(out: str | os.PathLike, size: str = "tiny", seed: int = 0,
                             workers: int | None = None) -> dict:
    """Write a synthetic FashionIQ-layout catalog under ``out``; returns its counts per category and split."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    catalog = _Catalog(seed)
    all_items: dict[str, Item] = {}
    counts: dict = {}
    for category in CATEGORIES:
        for split in SPLITS:
            n_triplets, n_images = SIZES[size][category][split]
            items, triplets = generate_split(catalog, category, n_triplets, n_images)
            if split == "test":
                triplets = [{"candidate": t["candidate"], "captions": t["captions"]} for t in triplets]
            _write_json(out / "captions" / f"cap.{category}.{split}.json", triplets)
            _write_json(out / "image_splits" / f"split.{category}.{split}.json", [i.id for i in items])
            all_items.update({i.id: i for i in items})
            counts[f"{category}.{split}"] = {"triplets": len(triplets), "images": len(items)}
    _render_all([(item, str(out / "images" / f"{item.id}.jpg")) for item in all_items.values()], workers)
    _write_json(out / "synthetic_attributes.json", {i.id: i.attributes() for i in all_items.values()})
    return counts


# (triplets, images) per CIRR split; "full" is CIRR's real sizes (train captions: about 28k)
CIRR_SIZES = {
    "tiny": {"train": (40, 60), "val": (30, 48), "test1": (12, 24)},
    "demo": {"train": (1200, 900), "val": (360, 240), "test1": (120, 96)},
    "full": {"train": (28225, 16939), "val": (4181, 2297), "test1": (4148, 2315)},
}
CIRR_FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}
SET_SIZE = 6  # a CIRR image subset: the reference, the target and visually similar images


def _cirr_split(catalog: _Catalog, split: str, n_triplets: int, n_images: int, first_pair: int
                ) -> tuple[dict[str, tuple[Item, str]], list[dict]]:
    """Image subsets of six similar garments (one garment and five with one or two attributes changed), and
    triplets within them whose caption says what changes; names and paths as CIRR has them."""
    rng, prefix = catalog.rng, CIRR_FOLDERS[split]
    images: dict[str, tuple[Item, str]] = {}
    sets = []
    for s in range(n_images // SET_SIZE):
        category = str(rng.choice(CATEGORIES))
        base = catalog.item(category)
        members = [base] + [catalog.item(category, catalog.changed(category, _attrs(base), int(rng.integers(1, 3)))[0])
                            for _ in range(SET_SIZE - 1)]
        names = [f"{prefix}-{s}-{j // 2}-img{j % 2}" for j in range(SET_SIZE)]
        folder = f"./{prefix}/{s % 100}" if split == "train" else f"./{prefix}"
        images.update({name: (item, f"{folder}/{name}.png") for name, item in zip(names, members)})
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
            changes = [(a, _attrs(members[r])[a], _attrs(members[g])[a]) for a in ATTRIBUTES
                       if _attrs(members[r])[a] != _attrs(members[g])[a]]
            if changes:
                break
        caption = " and ".join(str(rng.choice(_phrases(category, *change))) for change in changes)
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
    catalog = _Catalog(seed)
    jobs, counts, pair = [], {}, 0
    for split, (n_triplets, n_images) in CIRR_SIZES[size].items():
        images, triplets = _cirr_split(catalog, split, n_triplets, n_images, pair)
        pair += len(triplets)
        _write_json(out / "cirr" / "captions" / f"cap.rc2.{split}.json", triplets)
        _write_json(out / "cirr" / "image_splits" / f"split.rc2.{split}.json",
                    {name: path for name, (_, path) in images.items()})
        for item, path in images.values():
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            jobs.append((item, str(out / path)))
        counts[split] = {"triplets": len(triplets), "images": len(images)}
    _render_all(jobs, workers)
    return counts


IDENTITY_ATTRIBUTES = ("dark", "patterned", "striped", "dotted", "long_sleeves", "sleeveless", "dress", "shirt",
                       "toptee", "first_style")


def _identity_attributes(item: Item) -> list[int]:
    """CelebA-style binary attributes (1 / -1) of a garment, for the attribute-agreement metric."""
    values = [_luminance(item.colour) < 100, item.pattern != "plain", item.pattern == "striped",
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
    catalog = _Catalog(seed)
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
    _render_all(jobs, workers, _view)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", *IDENTITY_ATTRIBUTES])
        writer.writerows(rows)
    return {"identities": identities, "images": len(jobs)}
