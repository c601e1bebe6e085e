"""Modification captions: cleaning, the captions a training sample draws from, the one evaluation uses, and
what counts as an empty caption.

FashionIQ gives two captions per triplet; CLIP4Cir trains on four variants ("c1 and c2", "c2 and c1", "c1",
"c2") and evaluates on the first. CIRR and most user data give one caption, used as it is. A title-aware query
puts each variant in a frame that holds the reference's title ("{title} that {caption}", the title filled in).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from clip4cir.core.errors import DataError

CAPTION_STRIP = " \t\r\n.,;:!?"
# what crowd workers wrote when they had nothing to say; such a caption carries no information
PLACEHOLDER_CAPTIONS = re.compile(r"(n/?a|none|nan|null|-+)?", re.IGNORECASE)


def clean_caption(caption: str) -> str:
    """Strip the surrounding whitespace and end punctuation of a crowd-written caption."""
    return caption.strip(CAPTION_STRIP)


def is_empty_caption(caption: str) -> bool:
    """Whether a caption says nothing once cleaned: empty, or a placeholder such as "na", "n/a" or "none"."""
    return PLACEHOLDER_CAPTIONS.fullmatch(clean_caption(caption)) is not None


CAPTION_ONLY = "{caption}"  # the frame of a plain composed query: the caption alone
TITLE_TEMPLATE = "{title} that {caption}"  # the one measured (benchmark/README.md: chosen on a dev catalog)


def check_title_template(template: str) -> str:
    """A title template names {title} and {caption} once each and no other field; DataError otherwise."""
    fields = re.findall(r"{([^{}]*)}", template)
    if sorted(fields) != ["caption", "title"]:
        raise DataError(f"--title-template {template!r} must hold {{title}} and {{caption}} once each and no other "
                        f"field, e.g. {TITLE_TEMPLATE!r}")
    return template


def trained_title_template(data: dict) -> str | None:
    """The title template a model's training data record (``{"train": {"source": ...}}``) says its captions were
    framed with; None when they were not."""
    return ((data or {}).get("train") or {}).get("source", {}).get("title_template")


def title_frame(template: str, title: str | None) -> str:
    """The frame of a reference's captions: the template with its title filled in; the caption alone when it has
    no title (an uploaded photo, an item without one)."""
    title = " ".join((title or "").split()).replace("{", "(").replace("}", ")")  # never a field of the frame
    return template.replace("{title}", title) if title else CAPTION_ONLY


def framed(caption: str, frame: str = CAPTION_ONLY) -> str:
    """A caption put in its frame; inside a sentence it starts lower-case ("red dress that is blue")."""
    if frame == CAPTION_ONLY:
        return caption
    return frame.replace("{caption}", caption[:1].lower() + caption[1:] if caption[1:2].islower() else caption)


def caption_variants(captions: Sequence[str], frame: str = CAPTION_ONLY) -> list[str]:
    """The captions a training sample draws from, each in ``frame``; the first is the evaluation caption. One
    caption: itself. Two (FashionIQ): CLIP4Cir's "c1 and c2", "c2 and c1", "c1", "c2". More: all joined, then
    each alone."""
    if len(captions) == 1:
        return [framed(captions[0].strip(), frame)]
    cleaned = [clean_caption(c) for c in captions]
    if len(cleaned) == 2:
        c1, c2 = cleaned
        variants = [f"{c1.capitalize()} and {c2}", f"{c2.capitalize()} and {c1}", c1.capitalize(), c2.capitalize()]
    else:
        joined = " and ".join(cleaned)
        variants = [joined[:1].upper() + joined[1:]] + [c.capitalize() for c in cleaned]
    return [framed(v, frame) for v in variants]


def eval_caption(captions: Sequence[str], frame: str = CAPTION_ONLY) -> str:
    """The caption used for evaluation ("c1 and c2" for FashionIQ, as CLIP4Cir does), in ``frame``."""
    return caption_variants(captions, frame)[0]


def random_caption_variant(seed: int, epoch: int, index: int, n_variants: int = 4) -> int:
    """The variant a training sample uses: a pure function of (seed, epoch, index), so runs resume exactly."""
    return int(np.random.default_rng([seed, epoch, index]).integers(n_variants))


def count_empty_captions(triplets) -> int:
    """How many triplets have a caption that says nothing (see :func:`is_empty_caption`)."""
    return sum(any(map(is_empty_caption, t.captions)) for t in triplets)
