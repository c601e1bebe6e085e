"""The page address of a search (``?tab=composed&ref=...&caption=...``): each parameter read and checked, and each
one that cannot be used named, so a shared link, a reload or the browser's Back reruns the search it holds."""
from __future__ import annotations

from dataclasses import dataclass, field

from clip4cir.core.errors import shown
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.search import MAX_K
from clip4cir.serving.page import ALL, Choices


@dataclass
class Link:
    """What a page address asks for: a tab's search, and each parameter that cannot be used (named)."""

    tab: str = ""
    ref: str = ""
    query: str = ""
    category: str = ALL[1]
    k: int = 12
    mode: str = "combiner"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_link(q: dict, choices: Choices, index: Index) -> Link:
    """The page address's parameters, each checked: tab, ref, caption / q, category, k (1 to the result limit;
    "More results" goes past the slider) and mode."""
    if not q:
        return Link()
    problems = []
    tab = q.get("tab", "")
    if tab not in ("composed", "image", "text") or (tab in ("composed", "text") and not choices.words):
        problems.append(f"tab {shown_id(tab)} is not one of composed, image, text")
    link = Link(tab=tab, mode=choices.modes[0][1], problems=problems)
    try:
        link.k = int(q.get("k", 12))
        if not 1 <= link.k <= min(MAX_K, len(index)):
            raise ValueError
    except ValueError:
        problems.append(f"k {shown_id(q.get('k'))} is not a number of results from 1 to "
                        f"{min(MAX_K, len(index)):,}")
    values = choices.text_values if tab == "text" else choices.reference_values
    link.category = q.get("category", choices.defaults.get(tab, ALL[1]))
    if link.category not in values:
        problems.append(f"category {shown_id(link.category)} is not one of {', '.join(sorted(values))}")
    if tab in ("composed", "image"):
        link.ref = q.get("ref", "")
        if link.ref not in index:
            problems.append(f"ref {shown_id(link.ref)} is not an item of this catalog" if link.ref else
                            "ref (the reference's id) is missing")
    if tab == "composed":
        link.query = q.get("caption", "").strip()
        link.mode = q.get("mode", link.mode)
        if not link.query:
            problems.append("caption (the change) is empty")
        if link.mode not in choices.mode_names:
            problems.append(f"mode {shown_id(link.mode)} is not one of {', '.join(choices.mode_names)}")
    if tab == "text":
        link.query = q.get("q", "").strip()
        if not link.query:
            problems.append("q (the description) is empty")
    return link


def shown_id(value) -> str:
    """A value from a user, quoted and cut (an id of 100,000 characters is not echoed whole)."""
    return shown(value, 60)

