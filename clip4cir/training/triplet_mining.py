"""Triplets mined from a catalog's own titles, for a shop that has none (CoVR's idea, Ventura et al., AAAI 2024:
captions that differ in one word make a pair). Two titles of one category that differ in a single content word
("red striped dress" / "blue striped dress") give a (reference, caption, target) triplet; the caption says the
change from generic templates ("blue instead of red"), and among the images whose title has the new word the
target is the one whose image feature is nearest the reference's (what the title leaves unsaid should stay).
The result is a triplet file (clip4cir.data.sources.triplet_files) the supervised pipeline trains on as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip4cir.core.artifacts import atomic_write_text
from clip4cir.core.errors import DataError
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import Source
from clip4cir.models.encoder import Encoder
from clip4cir.models.features import extract_image_features
from clip4cir.training.textual_inversion import FUNCTION_WORDS, WORD

# how the caption says the change: generic English, none of them the synthetic catalogs' phrase bank
TEMPLATES = ("{new} instead of {old}", "change {old} to {new}", "make it {new}", "{new}, not {old}")
MAX_COOCCURRENCE = 0.01  # two words are alternatives (one attribute's values) when they share so few titles


@dataclass(frozen=True)
class TitleEdit:
    """An image, a content word of its title, the word that replaces it and the images whose title says the new
    word, not the old one, and nothing that contradicts the rest of the reference's title (the target's
    candidates)."""

    reference: str
    old: str
    new: str
    candidates: tuple[str, ...]


def content_words(text: str) -> tuple[str, ...]:
    return tuple(w for w in WORD.findall(text.lower()) if any(c.isalpha() for c in w) and w not in FUNCTION_WORDS)


def alternatives(texts: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Which words replace which: two content words are alternatives (values of one attribute, "red" and "blue")
    when some two titles differ in them alone and almost no title says both (a dress is not red and blue)."""
    contexts: dict[tuple, set[str]] = {}  # a title with one word blanked → the words seen in the blank
    count: dict[str, int] = {}
    together: dict[tuple[str, str], int] = {}
    for image_texts in texts.values():
        words_of_image = set()
        for text in image_texts:
            words = tuple(WORD.findall(text.lower()))
            for i, word in enumerate(words):
                if word in content_words(word):
                    contexts.setdefault(words[:i] + ("",) + words[i + 1:], set()).add(word)
                    words_of_image.add(word)
        for word in words_of_image:
            count[word] = count.get(word, 0) + 1
        for a in words_of_image:
            for b in words_of_image:
                if a < b:
                    together[a, b] = together.get((a, b), 0) + 1
    out: dict[str, set[str]] = {}
    for words in contexts.values():
        for a in words:
            for b in words:
                if a < b and together.get((a, b), 0) <= MAX_COOCCURRENCE * min(count[a], count[b]):
                    out.setdefault(a, set()).add(b)
                    out.setdefault(b, set()).add(a)
    return out


def title_edits(texts: dict[str, tuple[str, ...]], categories: dict[str, tuple[str, ...]], per_reference: int,
                seed: int) -> list[TitleEdit]:
    """Up to ``per_reference`` one-word edits of each image's title (drawn with ``seed``), within its category
    (``categories``: image → its categories; none counts as one), each with its candidate targets; edits without
    a candidate are left out. The same texts and seed give the same edits."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {}
    for image in sorted(texts):
        by_category.setdefault((categories.get(image) or ("",))[0], []).append(image)
    edits = []
    for category in sorted(by_category):
        images = by_category[category]
        alts = alternatives({i: texts[i] for i in images})
        words = {i: set(w for t in texts[i] for w in content_words(t)) for i in images}
        having: dict[str, set[str]] = {}
        for image in images:
            for word in words[image]:
                having.setdefault(word, set()).add(image)
        for reference in images:
            options = sorted((old, new) for old in words[reference] for new in alts.get(old, set()) - words[reference])
            for k in sorted(rng.permutation(len(options))[:per_reference].tolist()):
                old, new = options[k]
                contradicting = set().union(*(having[a] for other in words[reference] - {old}
                                              for a in alts.get(other, ())))
                candidates = having[new] - having.get(old, set()) - contradicting - {reference}
                if candidates:
                    edits.append(TitleEdit(reference, old, new, tuple(sorted(candidates))))
    return edits


def caption_pair(old: str, new: str, rng: np.random.Generator) -> list[str]:
    """Two captions of one edit, from two different templates (as FashionIQ gives two per triplet)."""
    first, second = rng.choice(len(TEMPLATES), 2, replace=False)
    return [TEMPLATES[first].format(old=old, new=new), TEMPLATES[second].format(old=old, new=new)]


def choose_triplets(edits: list[TitleEdit], features: dict[str, torch.Tensor], seed: int,
                    category_of: dict[str, tuple[str, ...]]) -> list[dict]:
    """Each edit with its candidate nearest the reference by image feature (unit vectors) as the target: triplet
    file rows (reference, target, two captions, category)."""
    rng = np.random.default_rng(seed)
    rows = []
    for edit in edits:
        similarity = torch.stack([features[c] for c in edit.candidates]) @ features[edit.reference]
        target = edit.candidates[int(similarity.argmax())]
        row = {"reference": edit.reference, "target": target, "caption": caption_pair(edit.old, edit.new, rng)}
        shared = [c for c in category_of.get(edit.reference, ()) if c in category_of.get(target, ())]
        rows.append({**row, "category": shared[0]} if shared else row)
    return rows


def check_output(output: str | Path) -> Path:
    """The triplet file to write: a new .jsonl file (nothing the user has is overwritten)."""
    output = Path(output)
    if output.suffix.lower() != ".jsonl":
        raise DataError(f"--output {output}: the triplet file is JSON Lines; name it .jsonl")
    if output.exists():
        raise DataError(f"--output {output} exists: choose a new file (this tool never overwrites one)")
    return output


def mine_triplets(encoder: Encoder, source: Source, output: str | Path, per_reference: int = 2, seed: int = 0,
                  workers: int = 0, progress: bool = True) -> dict[str, int]:
    """Mine the train and held-out images of ``source`` (image-text pairs) separately, so no val image is in a
    training triplet; write them as one triplet file (ids relative to the source's image folder, each row with its
    split, ``train`` or ``val``) to ``output``, which must not exist. Returns the triplets per split."""
    output = check_output(output)
    if source.protocol.val_split == "train":
        raise DataError(f"{source.describe()} has no held-out split to mine val triplets from (give it a val split)")
    edits = {}
    for split in ("train", source.protocol.val_split):
        texts = source.texts(split) if split in source.splits() else {}
        if not texts:
            raise DataError(f"{source.describe()} has no {split} image-text pairs to mine")
        edits[split] = title_edits(texts, source.gallery(split), per_reference, seed)
        if not edits[split]:
            raise DataError(f"{source.describe()}: no two {split} titles of one category differ in one word (two "
                            f"values of one attribute), so no triplet can be mined (titles of {len(texts):,} images)")
    rows, counts = [], {}
    for (split, split_edits), written in zip(edits.items(), ("train", "val")):
        ids, feats = extract_image_features(encoder, GalleryDataset(source, split, transform=encoder.transform),
                                            128, workers, progress, desc=f"{split} images")
        unit = dict(zip(ids, F.normalize(feats.float(), dim=-1)))
        mined = choose_triplets(split_edits, unit, seed, source.gallery(split))
        rows += [{**row, "split": written} for row in mined]
        counts[written] = len(mined)
    atomic_write_text(output, "".join(json.dumps(row) + "\n" for row in rows))
    return counts
