"""A change of category said in a caption ("is a t-shirt instead of a dress"): the words that name each of a
catalog's categories, learned from its own titles, and the one category a caption asks for, once what it moves
away from ("instead of a dress", "rather than", "not a") is set aside. Only a word the caption makes the item
("is a tee", "make it a frock", "should be a blouse", or a caption that starts "a frock ...") counts: captions
that mention a word in passing ("the shirt is white" of a t-shirt, "has a print") keep the reference's category
(on the real FashionIQ validation captions, whose targets never change category, looser matching switched 5.9%
of them)."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
AWAY = re.compile(r"\b(?:instead of|rather than|in place of|not|no longer|unlike|than|from)\s+(?:an?\s+|the\s+)?"
                  r"[a-z]+(?:-[a-z]+)*")
NAMING = re.compile(r"(?:^\W*an?\s+|\b(?:is|be|become|becomes|into|make it|now|want|wants)\s+(?:an?\s+)?)"
                    r"([a-z]+(?:-[a-z]+)*)")
MIN_TITLES = 3  # a word names a category when it is in at least this many of its titles,
COVERAGE = 0.25  # in at least this share of them (the nouns a shop's titles use: dress, frock, tee, blouse)
PURITY = 0.95  # and at least this share of the titles holding it are of that category


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def category_words(titled: Iterable[tuple[str, tuple[str, ...]]], categories: Iterable[str]) -> dict[str, str]:
    """word -> the category it names: each category's own name, and each word of the titles (``(title, the
    item's categories)``) that is in at least MIN_TITLES and COVERAGE of one category's titles, PURITY of the
    titles holding it being of that category."""
    named = {name.lower(): name for name in categories}
    counts: dict[str, Counter] = defaultdict(Counter)
    per_category: Counter = Counter()
    for title, item_categories in titled:
        if not item_categories:  # an item of no category names none
            continue
        per_category.update(item_categories[:1])
        for word in set(words(title)):
            counts[word].update(item_categories[:1])
    for word, by_category in counts.items():
        category, n = by_category.most_common(1)[0]
        if n >= max(MIN_TITLES, COVERAGE * per_category[category]) and n >= PURITY * sum(by_category.values()) \
                and word not in named:
            named[word] = category
    return named


def named_category(caption: str, vocabulary: dict[str, str]) -> tuple[str, str] | None:
    """(category, the word that names it) when the caption, with what it moves away from set aside, names
    exactly one category; None otherwise."""
    found = {vocabulary[w]: w for w in NAMING.findall(AWAY.sub(" ", caption.lower())) if w in vocabulary}
    return next(iter(found.items())) if len(found) == 1 else None
