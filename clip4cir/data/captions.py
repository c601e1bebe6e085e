"""Modification captions: cleaning, the captions a training sample draws from, the one evaluation uses, and
what counts as an empty caption.

FashionIQ gives two captions per triplet; CLIP4Cir trains on four variants ("c1 and c2", "c2 and c1", "c1",
"c2") and evaluates on the first. CIRR and most user data give one caption, used as it is.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

CAPTION_STRIP = " \t\r\n.,;:!?"
# what crowd workers wrote when they had nothing to say; such a caption carries no information
PLACEHOLDER_CAPTIONS = re.compile(r"(n/?a|none|nan|null|-+)?", re.IGNORECASE)


def clean_caption(caption: str) -> str:
    """Strip the surrounding whitespace and end punctuation of a crowd-written caption."""
    return caption.strip(CAPTION_STRIP)


def is_empty_caption(caption: str) -> bool:
    """Whether a caption says nothing once cleaned: empty, or a placeholder such as "na", "n/a" or "none"."""
    return PLACEHOLDER_CAPTIONS.fullmatch(clean_caption(caption)) is not None


def caption_variants(captions: Sequence[str]) -> list[str]:
    """The captions a training sample draws from; the first is the evaluation caption. One caption: itself.
    Two (FashionIQ): CLIP4Cir's "c1 and c2", "c2 and c1", "c1", "c2". More: all joined, then each alone."""
    if len(captions) == 1:
        return [captions[0].strip()]
    cleaned = [clean_caption(c) for c in captions]
    if len(cleaned) == 2:
        c1, c2 = cleaned
        return [f"{c1.capitalize()} and {c2}", f"{c2.capitalize()} and {c1}", c1.capitalize(), c2.capitalize()]
    joined = " and ".join(cleaned)
    return [joined[:1].upper() + joined[1:]] + [c.capitalize() for c in cleaned]


def eval_caption(captions: Sequence[str]) -> str:
    """The caption used for evaluation ("c1 and c2" for FashionIQ, as CLIP4Cir does)."""
    return caption_variants(captions)[0]


def random_caption_variant(seed: int, epoch: int, index: int, n_variants: int = 4) -> int:
    """The variant a training sample uses: a pure function of (seed, epoch, index), so runs resume exactly."""
    return int(np.random.default_rng([seed, epoch, index]).integers(n_variants))


def count_empty_captions(triplets) -> int:
    """How many triplets have a caption that says nothing (see :func:`is_empty_caption`)."""
    return sum(any(map(is_empty_caption, t.captions)) for t in triplets)
