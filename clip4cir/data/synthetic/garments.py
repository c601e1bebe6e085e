"""The synthetic garments every generated catalog is drawn from: their visible attributes (silhouette, colour,
pattern, sleeves and one category-specific attribute), the ways a shopper says that one changes, and the drawing
of a product photo. One random stream (:class:`Catalog`) decides everything a seed makes."""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 30, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (235, 205, 40),
    "black": (25, 25, 25), "white": (245, 245, 245), "pink": (245, 140, 185), "purple": (120, 50, 150),
    "orange": (240, 130, 30), "grey": (128, 128, 128),
}
WIDER_COLOURS = {  # only the pretraining corpus draws these: a wider space than the catalogs'
    "navy": (20, 30, 90), "brown": (110, 70, 40), "beige": (220, 200, 160), "teal": (20, 130, 130),
    "maroon": (120, 20, 45), "olive": (110, 120, 40),
}
PALETTE = {**COLOURS, **WIDER_COLOURS}
PATTERNS = ("plain", "striped", "dotted", "checked")
SLEEVES = ("sleeveless", "short", "long")  # ordered from shortest
SPECIFIC = {  # the category-specific attribute and its values
    "dress": ("length", ("mini", "knee", "maxi")),
    "shirt": ("neckline", ("round", "v-neck", "collar")),
    "toptee": ("print", ("none", "star", "heart")),
}
ATTRIBUTES = ("colour", "pattern", "sleeves", "specific")
FRAMING = (0.06, 0.04, 0.82, 225)  # a photo's largest shift (x, y), smallest scale, darkest background
WIDE_FRAMING = (0.1, 0.065, 0.7, 195)
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


def values_of(category: str, attribute: str, colours: tuple[str, ...] = tuple(COLOURS)) -> tuple[str, ...]:
    return {"colour": colours, "pattern": PATTERNS, "sleeves": SLEEVES,
            "specific": SPECIFIC[category][1]}[attribute]


def luminance(colour: str) -> float:
    r, g, b = PALETTE[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b


def phrases(category: str, attribute: str, old: str, new: str) -> list[str]:
    """Ways a shopper says that ``attribute`` changes from ``old`` to ``new``."""
    if attribute == "colour":
        out = [f"is {new} instead of {old}", f"is {new}", f"is {new} colored", f"is a {new} one"]
        delta = luminance(new) - luminance(old)
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


def captions_for(rng: np.random.Generator, category: str, changes: list[tuple[str, str, str]]) -> list[str]:
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
        parts = [rng.choice(phrases(category, *changes[i])) for i in sorted(subset)]
        text = " and ".join(str(p) for p in parts)
        text = (" " if rng.random() < 0.1 else "") + text + ("." if rng.random() < 0.15 else "")
        captions.append(text)
    return captions


class Catalog:
    """Draws items and ids from one random stream, so a seed decides everything; ``wide`` draws from the wider
    space of the pretraining corpus (more colours, looser framing and lighting)."""

    def __init__(self, seed: int, wide: bool = False):
        self.rng = np.random.default_rng(seed)
        self.ids: set[str] = set()
        self.colours = tuple(PALETTE if wide else COLOURS)
        self.framing = WIDE_FRAMING if wide else FRAMING

    def new_id(self) -> str:
        alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
        while True:
            image_id = "B0" + "".join(self.rng.choice(alphabet, 8))
            if image_id not in self.ids:
                self.ids.add(image_id)
                return image_id

    def item(self, category: str, attrs: dict | None = None) -> Item:
        rng = self.rng
        attrs = attrs or {a: str(rng.choice(values_of(category, a, self.colours))) for a in ATTRIBUTES}
        dx, dy, scale, background = self.framing
        return Item(self.new_id(), category, attrs["colour"], attrs["pattern"], attrs["sleeves"], attrs["specific"],
                    aspect=float(rng.uniform(1.3, 1.6)), dx=float(rng.uniform(-dx, dx)), dy=float(rng.uniform(-dy, dy)),
                    scale=float(rng.uniform(scale, 1.0)), background=int(rng.integers(background, 256)))

    def changed(self, category: str, attrs: dict, n_changes: int) -> tuple[dict, list[tuple[str, str, str]]]:
        new, changes = dict(attrs), []
        for attribute in self.rng.permutation(ATTRIBUTES)[:n_changes]:
            attribute = str(attribute)
            value = str(self.rng.choice([v for v in values_of(category, attribute, self.colours)
                                         if v != attrs[attribute]]))
            new[attribute] = value
            changes.append((attribute, attrs[attribute], value))
        return new, changes


NOUNS = {"dress": ("dress", "dress", "frock"), "shirt": ("shirt", "button-up shirt", "blouse"),
         "toptee": ("t-shirt", "top", "tee")}
PATTERN_WORDS = {"plain": ("plain", "solid", ""), "striped": ("striped", "stripe"),
                 "dotted": ("polka dot", "dotted", "spotted"), "checked": ("checked", "plaid", "check")}
SLEEVE_WORDS = {"sleeveless": ("sleeveless", "with no sleeves"), "short": ("short-sleeved", "with short sleeves"),
                "long": ("long-sleeved", "with long sleeves")}  # (before the noun, after it)
SPECIFIC_WORDS = {"mini": ("mini", ""), "knee": ("knee-length", ""), "maxi": ("maxi", ""),
                  "round": ("crew-neck", "with a round neck"), "v-neck": ("v-neck", "with a v neckline"),
                  "collar": ("collared", "with a collar"), "none": ("", ""), "star": ("", "with a star print"),
                  "heart": ("", "with a heart print")}


TITLE_NAMES = {"colour": 0.85, "pattern": 0.6, "sleeves": 0.5, "specific": 0.5}  # how often a title names each
RELATIVE_TITLES = 0.25  # the share of titles that say their attributes in a clause ("a dress that is red")
COMPARATIVES = ("instead", "longer", "shorter", "darker", "lighter", " one")


def title(item: Item) -> str:
    """A shop's title of an item, in varied wording, naming a random subset of its attributes (about 1 in 600 is
    the bare noun: a plain pattern or no print can have no word), some in a relative clause, so the noun alone
    must carry the category: a pure function of the item (its own random stream, so titles never change the
    catalog a seed draws)."""
    rng = np.random.default_rng(zlib.crc32(item.id.encode()))
    noun = str(rng.choice(NOUNS[item.category]))
    named = [a for a in ATTRIBUTES if rng.random() < TITLE_NAMES[a]] or [str(rng.choice(ATTRIBUTES))]
    value = attrs_of(item)
    if rng.random() < RELATIVE_TITLES:
        clauses = [str(rng.choice([p for p in phrases(item.category, a, value[a], value[a])
                                   if not any(c in p for c in COMPARATIVES)])) for a in named]
        text = f"{'a ' if rng.random() < 0.5 else ''}{noun} that " + " and ".join(clauses)
    else:
        text = _adjective_title(rng, item, noun, set(named))
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def _adjective_title(rng: np.random.Generator, item: Item, noun: str, named: set[str]) -> str:
    """"red striped maxi dress with long sleeves": the named attributes around the noun."""
    pattern = str(rng.choice(PATTERN_WORDS[item.pattern])) if "pattern" in named else ""
    sleeve_before, sleeve_after = SLEEVE_WORDS[item.sleeves] if "sleeves" in named else ("", "")
    specific_before, specific_after = SPECIFIC_WORDS[item.specific] if "specific" in named else ("", "")
    if specific_before and rng.random() < 0.5 and item.specific in ("round", "v-neck", "collar"):
        specific_before = ""  # the neckline said after the noun
    elif specific_before:
        specific_after = ""
    before = [item.colour if "colour" in named else "", pattern, specific_before]
    after = [specific_after]
    if rng.random() < 0.5:
        before.insert(0, sleeve_before)
    else:
        after.append(sleeve_after)
    words = " ".join(w for w in before if w)
    words = f"{words} {noun}" if words else noun
    tail = " and ".join(w.removeprefix("with ") if n else w for n, w in enumerate(a for a in after if a))
    return f"{words} {tail}" if tail else words


def attrs_of(item: Item) -> dict:
    return {"colour": item.colour, "pattern": item.pattern, "sleeves": item.sleeves, "specific": item.specific}


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, ...]:
    """Lighter (amount > 0) or darker (amount < 0) version of a colour."""
    return tuple(int(c + (255 - c) * amount) if amount > 0 else int(c * (1 + amount)) for c in rgb)


@dataclass(frozen=True)
class Frame:
    """Where the garment sits in a drawing of ``W`` × ``H`` pixels: its box (``gw`` × ``gh`` from ``x0, y0``)."""

    W: int
    H: int
    gw: float
    gh: float
    x0: float
    y0: float

    @classmethod
    def of(cls, item: Item, W: int, H: int) -> Frame:
        gw = W * 0.78 * item.scale
        gh = min(H * 0.9, gw * 1.45) * item.scale
        return cls(W, H, gw, gh, (W - gw) / 2 + item.dx * W, (H - gh) / 2 + item.dy * H)

    def p(self, u: float, v: float) -> tuple[float, float]:
        """A point given as fractions of the garment's box."""
        return self.x0 + u * self.gw, self.y0 + v * self.gh


def _silhouette(item: Item, f: Frame, draw: ImageDraw.ImageDraw) -> list[tuple[float, float]]:
    """The garment's shape drawn into a mask (body, then sleeves or straps); returns the body's outline."""
    p, dress = f.p, item.category == "dress"
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
    return body


def _fabric(pattern: str, base: tuple, accent: tuple, f: Frame) -> Image.Image:
    """The cloth, plain or patterned in the accent colour, as large as the drawing."""
    W, H = f.W, f.H
    fabric = Image.new("RGB", (W, H), base)
    fd = ImageDraw.Draw(fabric)
    step = max(4, int(f.gw / 9))
    if pattern == "striped":
        for y in range(0, H, step):
            fd.rectangle([0, y, W, y + step // 2 - 1], fill=accent)
    elif pattern == "dotted":
        for y in range(step // 2, H, step):
            for x in range((y // step % 2) * step // 2, W, step):
                fd.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=accent)
    elif pattern == "checked":
        for x in range(0, W, 2 * step):
            fd.rectangle([x, 0, x + step - 1, H], fill=accent)
        check = Image.new("L", (W, H), 0)
        cd = ImageDraw.Draw(check)
        for y in range(0, H, 2 * step):
            cd.rectangle([0, y, W, y + step - 1], fill=120)
        fabric = Image.composite(Image.new("RGB", (W, H), accent), fabric, check)
    return fabric


def _neckline(item: Item, f: Frame, d: ImageDraw.ImageDraw) -> None:
    """A v-neck, a collar with buttons, or a round neck."""
    p, neck_bg = f.p, (item.background,) * 3
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


def _graphic(item: Item, f: Frame, d: ImageDraw.ImageDraw) -> None:
    """A top's print: a star or a heart on the chest."""
    if item.category != "toptee" or item.specific == "none":
        return
    graphic = (250, 250, 250) if luminance(item.colour) < 140 else (20, 20, 20)
    cx, cy = f.p(0.5, 0.38)
    r = f.gw * 0.13
    if item.specific == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        points = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(radii, angles, strict=True)]
        d.polygon(points, fill=graphic)
    else:
        d.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.1], fill=graphic)
        d.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.1], fill=graphic)
        d.polygon([(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=graphic)


def render(item: Item, width: int = IMAGE_WIDTH) -> Image.Image:
    """Draw the product photo of an item: a garment on a plain background, slightly shifted and scaled."""
    height = int(round(width * item.aspect))
    ss = 2  # draw at twice the size, then downsample, for smooth edges
    W, H = width * ss, height * ss
    image = Image.new("RGB", (W, H), (item.background,) * 3)
    mask = Image.new("L", (W, H), 0)
    frame = Frame.of(item, W, H)
    body = _silhouette(item, frame, ImageDraw.Draw(mask))
    base = PALETTE[item.colour]
    accent = _shade(base, 0.55) if luminance(item.colour) < 100 else _shade(base, -0.45)
    image.paste(_fabric(item.pattern, base, accent, frame), (0, 0), mask)
    d = ImageDraw.Draw(image)
    d.polygon(body, outline=_shade(base, -0.5) if item.colour != "black" else (90, 90, 90), width=ss)
    _neckline(item, frame, d)
    _graphic(item, frame, d)
    return image.resize((width, height), Image.LANCZOS)


def _render_to(args: tuple[Item, str, int]) -> None:
    item, path, width = args
    render(item, width).save(path, quality=90)


def render_all(jobs: list, workers: int | None, draw=None) -> None:
    """Run every drawing job (``draw(job)``, default an (item, file, width) photo), in worker processes when there
    are many."""
    draw = draw or _render_to
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 200:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(draw, jobs, chunksize=64))
    else:
        for job in jobs:
            draw(job)


def write_pairs(path: Path, rows: list[tuple[Item, str, str | None]]) -> None:
    """The catalog's image-text pairs as JSON Lines: each (item, image path relative to the file, split or None)
    with the item's title and category (what image-text training reads, clip4cir.data.sources.pairs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item, image, split in rows:
            row = {"image": image, "text": title(item), "category": item.category}
            f.write(json.dumps({**row, "split": split} if split else row) + "\n")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
