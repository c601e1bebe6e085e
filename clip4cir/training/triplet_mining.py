"""Triplets mined from a catalog's own titles, for a shop that has none (CoVR's idea, Ventura et al., AAAI 2024:
captions that differ in one word make a pair). Two titles of one category that differ in a single content word
("red striped dress" / "blue striped dress") give a (reference, caption, target) triplet; the caption says the
change from generic templates ("blue rather than red"), and among the images whose title has the new word the
target is the one whose image feature is nearest the reference's (what the title leaves unsaid should stay).
The result is a triplet file (clip4cir.data.sources.triplet_files) the supervised pipeline trains on as it is.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from clip4cir.core.artifacts import atomic_write_text, check_output_file
from clip4cir.core.errors import DataError
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import Source
from clip4cir.data.sources.pairs import ImageTextPairs
from clip4cir.models.encoder import Encoder
from clip4cir.models.features import extract_image_features
from clip4cir.training.textual_inversion import FUNCTION_WORDS, WORD

# how the caption says the change: generic English, none of them the synthetic catalogs' phrase bank
TEMPLATES = ("{new} rather than {old}", "change {old} to {new}", "make it {new}", "{new}, not {old}")
MAX_COOCCURRENCE = 0.01  # two words are alternatives (one attribute's values) when they share so few titles...
MIN_EXPECTED_TOGETHER = 2.0  # ...of enough: independent words would share this many (else absence says nothing)


@dataclass(frozen=True)
class TitleEdit:
    """A one-word edit of an image's title: its content word ``old`` replaced by ``new``, said by ``captions``."""

    reference: str
    old: str
    new: str
    captions: tuple[str, str]


def is_content_word(token: str) -> bool:
    """A word that says something of the item: has a letter and is not a function word ("a", "with", ...)."""
    return any(c.isalpha() for c in token) and token not in FUNCTION_WORDS


def content_words(text: str) -> tuple[str, ...]:
    """The content words of ``text``, lower-cased, in order."""
    return tuple(w for w in WORD.findall(text.lower()) if is_content_word(w))


def alternatives(texts: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Which words replace which: two content words are alternatives (values of one attribute, "red" and "blue")
    when some two titles differ in them alone and almost no title says both, of enough titles that independent
    words would often be said together (a dress is not red and blue; "striped" and "red" are merely not always
    said)."""
    contexts: dict[tuple, set[str]] = {}  # a title with one word blanked → the words seen in the blank
    count: dict[str, int] = {}
    together: dict[tuple[str, str], int] = {}
    for image_texts in texts.values():
        words_of_image = set()
        for text in image_texts:
            words = tuple(WORD.findall(text.lower()))
            for i, word in enumerate(words):
                if is_content_word(word):
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
                if a < b and count[a] * count[b] / len(texts) >= MIN_EXPECTED_TOGETHER and \
                        together.get((a, b), 0) <= MAX_COOCCURRENCE * min(count[a], count[b]):
                    out.setdefault(a, set()).add(b)
                    out.setdefault(b, set()).add(a)
    return out


class CategoryTitles:
    """The titles of one category's images: which words replace which, and for an edit the images that can be its
    target (their title says the new word, not the old one, and no alternative of the reference's other words).
    Candidates are computed from one image × word table when asked, so memory stays linear in the images."""

    def __init__(self, texts: dict[str, tuple[str, ...]], alternatives_of: dict[str, set[str]] | None = None):
        """``alternatives_of``: which words replace which, if read off more titles than these (default: these)."""
        self.images = sorted(texts)
        self.index = {image: k for k, image in enumerate(self.images)}
        self.words = [set(w for t in texts[i] for w in content_words(t)) for i in self.images]
        self.alternatives = alternatives(texts) if alternatives_of is None else alternatives_of
        self.column = {w: k for k, w in enumerate(sorted(self.alternatives))}
        self.says = np.zeros((len(self.images), len(self.column)), dtype=bool)
        for k, words in enumerate(self.words):
            self.says[k, [self.column[w] for w in words if w in self.column]] = True

    def options(self, reference: str) -> list[tuple[str, str]]:
        """Every (old, new): a word of the reference's title and an alternative its title does not say."""
        words = self.words[self.index[reference]]
        return sorted((old, new) for old in words for new in self.alternatives.get(old, set()) - words)

    def candidates(self, reference: str, old: str, new: str) -> np.ndarray:
        """Indices (into ``images``) of the images that can be the target of this edit."""
        k = self.index[reference]
        excluded = {a for other in self.words[k] - {old} for a in self.alternatives.get(other, ())} - {new}
        mask = self.says[:, self.column[new]] & ~self.says[:, self.column[old]]
        if excluded:
            mask &= ~self.says[:, [self.column[w] for w in excluded]].any(axis=1)
        mask[k] = False
        return np.flatnonzero(mask)

    def edits(self, per_reference: int, seed: int) -> list[TitleEdit]:
        """Up to ``per_reference`` edits of each image's title that have a target, drawn with ``seed`` and the
        image's own id (adding an image changes no other image's draws)."""
        out = []
        for reference in self.images:
            rng = np.random.default_rng([seed, zlib.crc32(reference.encode())])
            options = self.options(reference)
            chosen = 0
            for k in rng.permutation(len(options)):
                if chosen == per_reference:
                    break
                old, new = options[k]
                if len(self.candidates(reference, old, new)):
                    out.append(TitleEdit(reference, old, new, caption_pair(old, new, rng)))
                    chosen += 1
        return out

    def targets(self, edits: list[TitleEdit], features: np.ndarray) -> list[str]:
        """Each edit's candidate nearest its reference by image feature (``features``: unit rows, in the order of
        ``images``)."""
        out = []
        for edit in edits:
            candidates = self.candidates(edit.reference, edit.old, edit.new)
            similarity = features[candidates] @ features[self.index[edit.reference]]
            out.append(self.images[candidates[int(similarity.argmax())]])
        return out


def caption_pair(old: str, new: str, rng: np.random.Generator) -> tuple[str, str]:
    """Two captions of one edit, from two different templates (as FashionIQ gives two per triplet)."""
    first, second = rng.choice(len(TEMPLATES), 2, replace=False)
    return TEMPLATES[first].format(old=old, new=new), TEMPLATES[second].format(old=old, new=new)


Plan = dict[str, list[tuple[CategoryTitles, list[TitleEdit]]]]  # split → each category's titles and edits


def plan_triplets(source: Source, per_reference: int = 2, seed: int = 0) -> Plan:
    """The edits of the train and val titles of an image-text pairs ``source``, by category (an image's first; none
    counts as one): which words replace which is read off both splits' titles, the edits and their targets within
    a split (no val image is in a training triplet). Text only, before any image is read; a split with no edit
    that has a target is an error."""
    if not isinstance(source, ImageTextPairs):
        raise DataError(f"mining reads image-text pairs over an image folder (a .jsonl/.csv of image,text rows or "
                        f"images with sidecar .txt files), not {source.describe()}")
    by_category: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}  # category → split → image → texts
    for split in ("train", "val"):
        texts, categories = source.texts(split), source.gallery(split)
        for image in texts:
            by_category.setdefault((categories.get(image) or ("",))[0], {}).setdefault(split, {})[image] = texts[image]
    # the words' relations are the catalog's language, read off all its titles; images are mined per split
    words = {c: alternatives({f"{s}/{i}": t for s, ts in splits.items() for i, t in ts.items()})
             for c, splits in by_category.items()}
    plan: Plan = {}
    for split in ("train", "val"):
        groups = [(titles, titles.edits(per_reference, seed)) for titles in
                  (CategoryTitles(splits[split], words[c]) for c, splits in by_category.items() if split in splits)]
        plan[split] = [(titles, edits) for titles, edits in groups if edits]
        if not plan[split]:
            titled = sum(len(titles.images) for titles, _ in groups)
            raise DataError(f"{source.describe()}: no one-word edit of the {titled:,} {split} titles has a target "
                            f"image (two titles of one category that differ in one word, two values of one attribute)")
    return plan


def check_output(output: str | os.PathLike) -> Path:
    """The triplet file to write: a new .jsonl file in a folder that exists and can be written."""
    path = check_output_file(output, "--output")
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"--output {output}: the triplet file is JSON Lines; name it .jsonl")
    if path.exists():
        raise DataError(f"--output {output} exists: choose a new file (this tool never overwrites one)")
    if not os.access(path.parent, os.W_OK):
        raise DataError(f"--output {output}: the folder {path.parent} cannot be written")
    return path


def mine_triplets(encoder: Encoder, source: Source, plan: Plan, output: str | os.PathLike, workers: int = 0,
                  progress: bool = True) -> dict[str, int]:
    """Choose each planned edit's target by ``encoder``'s image features and write the triplets to ``output`` (a
    new file) as one triplet file: ids relative to the source's image folder, each row with its split and category.
    Returns the triplets per split."""
    output = check_output(output)
    rows, counts = [], {}
    for split, groups in plan.items():
        ids, feats = extract_image_features(encoder, GalleryDataset(source, split, transform=encoder.transform),
                                            128, workers, progress, desc=f"{split} images")
        unit = dict(zip(ids, F.normalize(feats.float(), dim=-1).numpy(), strict=True))
        categories = source.gallery(split)
        for titles, edits in groups:
            targets = titles.targets(edits, np.stack([unit[i] for i in titles.images]))
            for edit, target in zip(edits, targets, strict=True):
                shared = [c for c in categories[edit.reference] if c in categories[target]]
                rows.append({"reference": edit.reference, "target": target, "caption": list(edit.captions),
                             **({"category": shared[0]} if shared else {}), "split": split})
        counts[split] = sum(len(edits) for _, edits in groups)
    check_output(output)  # nothing appeared there while the images were encoded
    atomic_write_text(output, "".join(json.dumps(row) + "\n" for row in rows))
    return counts
