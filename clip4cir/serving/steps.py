"""The steps of a refinement in the app: each composed search that found something is a step (its reference, an
item id or an uploaded photo, its caption, category, number of results and mode). The browser keeps them in the
tab's session storage and sends them back, so they are checked here like any other input; each has a label the
steps trail shows (naming an upload by its file name) and a step can be searched again."""
from __future__ import annotations

from collections.abc import Callable, Container

MAX_STEPS = 50  # steps of a refinement kept
MAX_CAPTION = 2_000  # characters of a caption kept in a step


def whole_number(value, default: int, high: int) -> int:
    """A number of results from the page address or the steps (text a user can edit): within 1..high."""
    try:
        return min(max(int(value), 1), high)
    except (TypeError, ValueError):
        return default


def same_step(a: dict, b: dict) -> bool:
    """Two steps are the same query (the number of results aside)."""
    return all(a.get(key) == b.get(key) for key in ("ref", "caption", "category", "mode")) \
        and bool(a.get("ref") or (a.get("image") or {}).get("path") == (b.get("image") or {}).get("path"))


def upload_name(step: dict) -> str:
    """The file name of a step's uploaded photo, as the user's computer called it."""
    image = step.get("image") or {}
    name = image.get("orig_name") or str(image.get("path") or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name or "your photo"


def step_label(number: int, step: dict, mode_names: dict[str, str]) -> str:
    """How the trail shows a step: its number, reference, caption and mode."""
    reference = step["ref"] or upload_name(step)
    return f"{number}. {reference} + “{step['caption']}” ({mode_names.get(step['mode'], step['mode'])})"


def clean_steps(steps, has_item: Callable[[str], bool], categories: Container[str], modes: Container[str],
                high: int) -> list[dict]:
    """The steps a client sent back (from its session storage, so anything): those that can be searched again,
    the last MAX_STEPS; an uploaded photo is kept as the client sent it (the search reads it only if it is still
    one of this app's uploads)."""
    kept = []
    for s in steps if isinstance(steps, list) else []:
        if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or not isinstance(s.get("ref"), str):
            continue
        if (s["ref"] and not has_item(s["ref"])) or s.get("category") not in categories \
                or s.get("mode") not in modes:
            continue
        image = s.get("image") if not s["ref"] and isinstance(s.get("image"), dict) else None
        kept.append({"ref": s["ref"], "image": image, "caption": s["caption"][:MAX_CAPTION],
                     "category": s["category"], "k": whole_number(s.get("k"), 12, high), "mode": s["mode"]})
    return kept[-MAX_STEPS:]
