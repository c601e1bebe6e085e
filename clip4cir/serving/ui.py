"""The Gradio app's actions: composed, image and text search over one search engine, a catalog browser to pick a
reference, and the events that tie them to the page (its layout: clip4cir.serving.page).

The first screen holds a ready example: an annotated catalog item and a change written for it. The page address
holds each search (composed, image by id, text), so a link reproduces it and the browser's Back goes to the previous
one (clip4cir.serving.links reads it); the steps of a refinement (each composed search) are kept in the tab's
session storage, so the app's Back, which shows the previous step's results at once, survives a reload
(clip4cir.serving.steps checks them). Each result shows its title (when the catalog has titles) and how well it
fits in words (clip4cir.retrieval.match_levels); a notice says when nothing fits. Choosing a new reference clears
what belonged to the old one. The named API for programmatic clients is clip4cir.serving.api; uploads are read by
clip4cir.serving.uploads.
"""
from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from clip4cir.core.errors import Clip4CirError, SearchError  # noqa: E402
from clip4cir.retrieval.search import MAX_K, NOTHING_FITS, SearchEngine, SearchResult  # noqa: E402
from clip4cir.retrieval.threads import configure_serving_threads  # noqa: E402
from clip4cir.retrieval.tuning import describe_tuning  # noqa: E402
from clip4cir.serving.api import add_named_api  # noqa: E402
from clip4cir.serving.catalog_routes import add_catalog_routes  # noqa: E402
from clip4cir.serving.clip_retrieval_api import add_clip_retrieval_api  # noqa: E402
from clip4cir.serving.http_api import add_http_api  # noqa: E402
from clip4cir.serving.links import Link, read_link, shown_id  # noqa: E402
from clip4cir.serving.page import (  # noqa: E402
    ALL,
    FOCUS_CAPTION,
    HEAD,
    LOAD_STEPS,
    MAX_RESULTS,
    SAVE_STEPS,
    Choices,
    Page,
    Shown,
    address,
    plain,
    scroll_to,
)
from clip4cir.serving.service import thumbnails_for  # noqa: E402
from clip4cir.serving.steps import MAX_STEPS, clean_steps, same_step, step_label, upload_name  # noqa: E402
from clip4cir.serving.thumbnails import Thumbnails  # noqa: E402
from clip4cir.serving.uploads import read_upload, uploaded_path  # noqa: E402

MORE = 24  # results "More results" adds
PAGE = 24  # items per page of the catalog browser
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads; load_image refuses more than 50 megapixels
EXAMPLE_CAPTION = "is darker"  # the first screen's change when the catalog has no annotated ones
WARNING_SECONDS = 6  # how long a warning stays
PRIVATE = {"api_visibility": "private"}  # no event of the page is an API endpoint (see serving.api)
log = logging.getLogger(__name__)


def no_suggestions() -> dict:
    """The suggested-captions control emptied and hidden (a reference without annotated captions, or none)."""
    return gr.update(choices=[], value=None, visible=False)


def rank_of(result: SearchResult, item_id: str) -> int | None:
    """Where an item ranks among a search's results (None when not among them)."""
    return next((rank for rank, h in enumerate(result.hits, 1) if h.id == item_id), None)


def warn(message: str) -> None:
    """One short warning (it never stays long enough to follow the user elsewhere)."""
    gr.Warning(html.escape(message), duration=WARNING_SECONDS)


class App:
    """The app's state and actions over one engine; :meth:`build` lays out the page and wires its events."""

    def __init__(self, engine: SearchEngine, thumbnails: Thumbnails):
        self.engine, self.thumbnails = engine, thumbnails
        self.index = engine.index
        self.choices = Choices.of(engine)
        self.suggested = self.index.captions
        self.titles = self.index.titles

    # ---- results --------------------------------------------------------------------------------------------
    def name(self, item_id: str) -> str:
        """An item as a person reads it: its title, else its id."""
        return self.titles.get(item_id) or item_id

    def gallery(self, result: SearchResult, target_id: str = "") -> list[tuple[str, str]]:
        """Thumbnails captioned in full: rank and id (★ on the known target), the title, then the categories and
        how well it fits (the score where the catalog gives no match levels)."""
        return [(self.thumbnails.small(h.id), f"{rank}. {h.id}" + (" ★ target" if h.id == target_id else "")
                 + (f"\n{h.title}" if h.title else "")
                 + f"\n{', '.join(h.categories) or '-'} · {h.match or f'score {h.score:.3f}'}")
                for rank, h in enumerate(result.hits, 1)]

    def shown(self, search: Callable[[], SearchResult], target_id: str = "", used: str = "",
              target_rank: Callable[[], int | None] | None = None) -> Shown:
        """Run a UI search: its results shown, or, for a bad query, a warning and a message line (never a stack
        trace; the app stays up whatever happens). ``used``: what the query was made from, for the message;
        ``target_rank``: where the known target ranks, asked when it is not among the results."""
        try:
            result = search()
        except Clip4CirError as e:  # a bad query, a busy server, a vector database that does not answer
            warn(str(e))
            return Shown(info=f"⚠️ {plain(str(e))}", failed=True)
        except Exception as e:
            log.exception("search failed")
            warn(f"search failed: {e}")
            return Shown(info=f"⚠️ search failed: {plain(str(e))}", failed=True)
        ids = [h.id for h in result.hits]
        parts = ([used] if used else []) + [f"{len(result.hits)} results in {1000 * result.seconds:.0f} ms"]
        if result.category:
            parts.append(f"within {plain(result.category)}")
        if target_id and target_id not in ids and target_rank is not None:
            rank = target_rank()
            parts.append(f"★ the known target ranks {rank:,}" if rank else
                         "★ the known target is not within the first results searched")
        notes = [f"**{plain(n)}**" if n == NOTHING_FITS else plain(n) for n in result.notes]
        return Shown(self.gallery(result, target_id), " · ".join(parts + notes), ids)

    def used(self, reference_id: str, upload=None) -> str:
        if reference_id:
            return f"reference: {plain(self.name(reference_id))} ({plain(reference_id)})"
        return f"reference: your photo {plain(upload_name({'image': upload}))}" if isinstance(upload, dict) \
            else "reference: your photo"

    # ---- the catalog ------------------------------------------------------------------------------------------
    def find(self, text: str, limit: int = PAGE) -> list[str]:
        """Items whose title or id holds ``text``, in any case (titles first), then ids that start with it."""
        needle = text.lower()
        found = [i for i, title in self.titles.items() if needle in title.lower() or needle in i.lower()][:limit]
        for prefix in dict.fromkeys((text, text.upper(), text.lower())):
            found += [i for i in self.index.find_ids(prefix, limit) if i not in found]
        return found[:limit]

    def browse(self, category: str | None, page: int, seed: int, lookup: str):
        """A page of the catalog: items found by name or id, or a random sample (of a category); annotated items
        first on the first page, so their suggestions are one click away."""
        if lookup.strip():
            ids = self.find(lookup.strip())
        else:
            name = None if category in (None, ALL[1]) else category
            ids = self.index.sample(PAGE * (page + 1), name, seed)[PAGE * page:]
            if page == 0 and seed == 0 and name is None:
                ids = list(dict.fromkeys(list(self.suggested)[:PAGE] + ids))[:PAGE]
        items = [(self.thumbnails.small(i), f"{self.titles[i]}\n{i}" if i in self.titles else i) for i in ids]
        label = f"page {page + 1}" if not lookup.strip() else \
            f"{len(ids)} items whose name or id holds “{plain(lookup.strip())}”"
        return items, ids, label

    def reference_shown(self, item_id: str, steps: list[dict] | None = None) -> dict:
        """A new reference: its image and id, its written changes as suggestions, an empty caption, and nothing
        left of the old reference (results, message, known target, highlight); ``steps``: the trail goes on
        (a clicked result), else a new one starts."""
        c, item_id = self.ui, (item_id or "").strip()
        if item_id and item_id not in self.index:
            warn(f"no item {shown_id(item_id)} in this catalog; try the catalog's search by name or id")
            return {c.composed.reference: None, c.composed.reference_id: item_id,
                    c.composed.suggestions: no_suggestions(), c.composed.target_id: ""}
        captions = [caption for caption, _ in self.suggested.get(item_id, [])]
        info = (f"Reference: {plain(self.name(item_id))} ({plain(item_id)}). Say how the item you want differs."
                if item_id else "")
        return {c.composed.reference: self.thumbnails.large(item_id) if item_id else None,
                c.composed.reference_id: item_id,
                c.composed.suggestions: gr.update(choices=captions, value=None, visible=bool(captions)),
                c.composed.target_id: "", c.composed.caption: "", c.composed.comparison: "",
                **c.composed.panel.show(Shown(info=info), 1),
                **self.steps_shown(steps or [])}

    def example(self) -> tuple[str, str, str] | None:
        """The first screen's example: an annotated item with its first written change and that change's target,
        or any item with a generic change; None for an empty catalog."""
        for item_id, captions in self.suggested.items():
            if item_id in self.index and captions:
                return item_id, captions[0][0], captions[0][1]
        some = self.index.ids(1)
        return (some[0], EXAMPLE_CAPTION, "") if some else None

    # ---- the page and its events ------------------------------------------------------------------------------
    def build(self, about: str) -> gr.Blocks:
        with gr.Blocks(title="Composed image retrieval") as blocks:
            self.ui = ui = Page.build(self.choices, about)
            add_named_api(self.engine)
            composed = ui.composed
            self.composed_outputs = composed.panel.outputs + [ui.steps, composed.trail, composed.back,
                                                              composed.comparison]
            self.step_outputs = [composed.reference, composed.reference_id, composed.caption, composed.category,
                                 composed.k, composed.mode, composed.suggestions, composed.target_id,
                                 *self.composed_outputs]
            self.pick_outputs = [composed.reference, composed.reference_id, composed.suggestions, composed.target_id,
                                 composed.caption, *self.composed_outputs]
            self._wire_composed(ui)
            self._wire_browser(ui)
            self._wire_image(ui)
            self._wire_text(ui)
            self._wire_opening(ui, blocks)
        return blocks

    def _wire_composed(self, ui: Page) -> None:
        """Search, More results, Compare, Back and the trail, and picking a reference by id or upload."""
        c = ui.composed
        inputs = [c.reference, c.caption, c.category, c.k, c.mode, c.reference_id, c.target_id, ui.steps]
        named = [c.reference_id, c.caption, c.category, c.k, c.mode, ui.steps]
        names = ["ref", "caption", "category", "k", "mode"]
        for trigger in (c.search.click, c.caption.submit):
            trigger(self.composed, inputs, self.composed_outputs, preprocess=False, **PRIVATE).then(
                None, named, js=address("composed", names, steps=True)).then(None, js=scroll_to("composed-results"))
        c.panel.more.click(self.composed_more, inputs[:-1] + [c.panel.hits], c.panel.outputs, preprocess=False,
                           **PRIVATE).then(None, [c.reference_id, c.caption, c.category, c.panel.count, c.mode],
                                           js=address("composed", names, push=False))
        c.compare.click(self.compare, inputs[:-1], c.comparison, preprocess=False, **PRIVATE)
        c.back.click(self.step_back, ui.steps, self.step_outputs, **PRIVATE).then(
            None, named, js=address("composed", names, push=False, steps=True)).then(
            None, js=scroll_to("composed-results"))
        c.trail.select(self.step_to, ui.steps, self.step_outputs, **PRIVATE).then(
            None, named, js=address("composed", names, push=False, steps=True)).then(
            None, js=scroll_to("composed-results"))
        c.reference.upload(self.uploaded, c.reference, self.pick_outputs, preprocess=False, **PRIVATE)
        c.reference.clear(lambda: self.reference_shown(""), None, self.pick_outputs, **PRIVATE)
        c.reference_id.submit(self.reference_shown, c.reference_id, self.pick_outputs, **PRIVATE).then(
            None, js=FOCUS_CAPTION)
        c.suggestions.select(self.suggest, [c.reference_id, c.suggestions], [c.caption, c.target_id], **PRIVATE)
        # a result, in any tab, becomes the reference of the next composed search (the trail goes on)
        for panel in (c.panel, ui.image.panel, ui.text.panel) if self.choices.words else ():
            panel.gallery.select(self.refine, [panel.hits, ui.steps], self.pick_outputs + [ui.tabs],
                                 **PRIVATE).then(None, js=FOCUS_CAPTION)

    def _wire_browser(self, ui: Page) -> None:
        """The catalog browser: category, lookup, shuffle, pages, and a click that picks the reference."""
        b = ui.composed.browser
        b.category.change(lambda cat, p, s, look: self.browse(cat, 0, s, look) + (0,), b.inputs,
                          b.outputs + [b.page], **PRIVATE)
        b.lookup.submit(lambda cat, p, s, look: self.browse(cat, 0, s, look) + (0,), b.inputs,
                        b.outputs + [b.page], **PRIVATE)
        b.shuffle.click(lambda cat, p, s, look: self.browse(cat, 0, s + 1, "") + (0, s + 1), b.inputs,
                        b.outputs + [b.page, b.seed], **PRIVATE)
        b.next.click(lambda cat, p, s, look: self.browse(cat, p + 1, s, look) + (p + 1,), b.inputs,
                     b.outputs + [b.page], **PRIVATE)
        b.previous.click(lambda cat, p, s, look: self.browse(cat, max(p - 1, 0), s, look) + (max(p - 1, 0),),
                         b.inputs, b.outputs + [b.page], **PRIVATE)
        b.gallery.select(self.pick_from, b.ids, self.pick_outputs, **PRIVATE).then(None, js=FOCUS_CAPTION)

    def _wire_image(self, ui: Page) -> None:
        """Find similar: search by photo or id, More results, and More like the composed tab's reference."""
        i, c = ui.image, ui.composed
        named, names = [i.item_id, i.category, i.k], ["ref", "category", "k"]
        if not self.choices.words:
            i.panel.gallery.select(self.clicked, i.panel.hits, i.item_id, **PRIVATE).then(
                self.image, i.inputs, i.panel.outputs + [i.photo], preprocess=False, **PRIVATE).then(
                None, named, js=address("image", names))
        i.photo.upload(self.checked_upload, i.photo, [i.photo, i.item_id], preprocess=False, **PRIVATE)
        for trigger in (i.search.click, i.item_id.submit):
            trigger(self.image, i.inputs, i.panel.outputs + [i.photo], preprocess=False, **PRIVATE).then(
                None, named, js=address("image", names)).then(None, js=scroll_to("image-results"))
        i.panel.more.click(self.image_more, i.inputs + [i.panel.hits], i.panel.outputs, preprocess=False,
                           **PRIVATE).then(None, [i.item_id, i.category, i.panel.count],
                                           js=address("image", names, push=False))
        c.similar.click(self.similar, [c.reference, c.reference_id, c.category, c.k],
                        i.panel.outputs + [ui.tabs, i.photo, i.item_id, i.category, i.k], preprocess=False,
                        **PRIVATE).then(None, named, js=address("image", names)).then(
            None, js=scroll_to("image-results"))

    def _wire_text(self, ui: Page) -> None:
        """Describe it: search and More results."""
        t = ui.text
        names = ["q", "category", "k"]
        for trigger in (t.search.click, t.query.submit):
            trigger(self.text, t.inputs, t.panel.outputs, **PRIVATE).then(
                None, t.inputs, js=address("text", names)).then(None, js=scroll_to("text-results"))
        t.panel.more.click(self.text_more, t.inputs + [t.panel.hits], t.panel.outputs, **PRIVATE).then(
            None, [t.query, t.category, t.panel.count], js=address("text", names, push=False))

    def _wire_opening(self, ui: Page, blocks: gr.Blocks) -> None:
        """Opening the page: the search its address holds, with the steps from session storage."""
        i, t = ui.image, ui.text
        self.restore_outputs = list(dict.fromkeys(
            self.step_outputs + self.pick_outputs + i.panel.outputs + t.panel.outputs + ui.composed.browser.outputs
            + [ui.tabs, i.photo, i.item_id, i.category, i.k, t.query, t.category, t.k]))
        blocks.load(self.restore, ui.steps, self.restore_outputs, js=LOAD_STEPS, **PRIVATE).then(
            None, ui.steps, js=SAVE_STEPS).then(None, js=scroll_to("composed-results", "image-results",
                                                                   "text-results"))

    # ---- composed search and its steps -----------------------------------------------------------------------
    def run_composed(self, image, caption, category, k, mode, reference_id, target_id) -> Shown:
        reference_id = (reference_id or "").strip()
        return self.shown(lambda: self.engine.composed_search(
            caption, None if reference_id else read_upload(image), reference_id or None, int(k), category, mode),
            target_id, self.used(reference_id, None if reference_id else image),
            lambda: self.target_rank(caption, reference_id, category, mode, target_id))

    def target_rank(self, caption: str, reference_id: str, category: str, mode: str, target_id: str) -> int | None:
        """Where the known target ranks for this query (None beyond the first MAX_K)."""
        result = self.engine.composed_search(caption, None, reference_id, min(MAX_K, len(self.index) - 1),
                                             category, mode)
        return rank_of(result, target_id)

    def composed(self, image, caption, category, k, mode, reference_id, target_id, steps) -> dict:
        """A composed search; a new step of the refinement when it found something (a repeat only updates k)."""
        shown = self.run_composed(image, caption, category, k, mode, reference_id, target_id)
        steps = self.checked_steps(steps)
        step = {"ref": (reference_id or "").strip(), "image": None if reference_id else image,
                "caption": caption or "", "category": category, "k": int(k), "mode": mode}
        if not shown.failed:
            steps = (steps[:-1] if steps and same_step(steps[-1], step) else steps) + [step]
        return {**self.ui.composed.panel.show(shown, int(k)), **self.steps_shown(steps[-MAX_STEPS:])}

    def composed_more(self, image, caption, category, k, mode, reference_id, target_id, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        shown = self.run_composed(image, caption, category, total, mode, reference_id, target_id)
        return self.ui.composed.panel.show(shown, total)

    def compare(self, image, caption, category, k, mode, reference_id, target_id) -> str:
        """The same query in every way of combining picture and words, side by side: the first five of each and,
        for an annotated example, where the known target ranks (one search a way: deep enough to find it)."""
        reference_id = (reference_id or "").strip()
        shown, ranked = min(int(k), 5), bool(target_id and reference_id)
        depth = min(MAX_K, len(self.index) - 1) if ranked else shown
        rows = []
        for label, value in self.choices.modes:
            try:
                result = self.engine.composed_search(caption, None if reference_id else read_upload(image),
                                                     reference_id or None, depth, category, value)
            except Clip4CirError as e:
                return f"⚠️ {plain(str(e))}"
            rank = rank_of(result, target_id) if ranked else None
            first = "; ".join(plain(self.name(h.id)) + (" ★" if h.id == target_id else "")
                              for h in result.hits[:shown])
            rows.append(f"| {label} | {first} | {rank if rank else '-'} |")
        return "\n".join([f"**“{plain(caption or '')}”, each way:**", "", "| way | first results | ★ rank |",
                          "|---|---|---|", *rows])

    def steps_shown(self, steps: list[dict]) -> dict:
        """The steps kept, the trail (each step clickable) and whether Back can go anywhere."""
        c = self.ui
        labels = [(step_label(n, s, self.choices.mode_names), n - 1) for n, s in enumerate(steps, 1)]
        return {c.steps: steps, c.composed.back: gr.update(interactive=len(steps) > 1),
                c.composed.trail: gr.update(choices=labels, value=len(steps) - 1 if steps else None,
                                      visible=len(steps) > 1)}

    def checked_steps(self, steps) -> list[dict]:
        return clean_steps(steps, lambda i: i in self.index, self.choices.reference_values, self.choices.mode_names,
                           MAX_RESULTS)

    def show_step(self, steps: list[dict]) -> dict:
        """The last step of ``steps`` on the page: its query in the controls and its results, searched again."""
        c, step = self.ui, steps[-1]
        if step["ref"]:
            shown_reference = self.reference_shown(step["ref"], steps)
            image, suggestions = shown_reference[c.composed.reference], shown_reference[c.composed.suggestions]
        else:
            try:
                image = uploaded_path(step["image"])
            except SearchError:
                image = None
            suggestions = no_suggestions()
        target = self.suggest(step["ref"], step["caption"])[1]
        shown = self.run_composed(step["image"], step["caption"], step["category"], step["k"], step["mode"],
                                  step["ref"], target)
        if step["ref"] and suggestions.get("choices") and step["caption"] in suggestions["choices"]:
            suggestions["value"] = step["caption"]
        return {c.composed.reference: image, c.composed.reference_id: step["ref"], c.composed.caption: step["caption"],
                c.composed.category: step["category"], c.composed.k: step["k"], c.composed.mode: step["mode"],
                c.composed.suggestions: suggestions, c.composed.target_id: target, c.composed.comparison: "",
                **c.composed.panel.show(shown, step["k"]), **self.steps_shown(steps)}

    def step_back(self, steps) -> dict:
        """Back one step: the previous step's query and its results at once."""
        steps = self.checked_steps(steps)
        if len(steps) < 2:
            return self.steps_shown(steps)
        return self.show_step(steps[:-1])

    def step_to(self, steps, evt: gr.SelectData) -> dict:
        """Back to a step of the trail (the steps after it are dropped)."""
        steps = self.checked_steps(steps)
        at = evt.index if isinstance(evt.index, int) else 0
        return self.show_step(steps[:at + 1]) if 0 <= at < len(steps) else self.steps_shown(steps)

    def suggest(self, reference_id: str, caption: str):
        """A suggested caption, and its known target (marked in the results)."""
        target = next((t for c, t in self.suggested.get(reference_id, []) if c == caption), "")
        return caption, target

    def pick_from(self, ids: list[str], evt: gr.SelectData) -> dict:
        return self.reference_shown(ids[evt.index])

    def refine(self, ids: list[str], steps, evt: gr.SelectData) -> dict:
        """A clicked result becomes the reference of the next composed search, with an empty caption (in one
        update, so a caption typed right after the click is never cleared); the trail goes on."""
        return {**self.reference_shown(ids[evt.index], self.checked_steps(steps)),
                self.ui.tabs: gr.Tabs(selected="composed")}

    def uploaded(self, image) -> dict:
        """A photo uploaded as the reference: checked at once (a file that is not an image is refused now, not at
        Search); a new trail starts."""
        c = self.ui
        try:
            read_upload(image)
        except Clip4CirError as e:
            warn(str(e))
            return {**self.reference_shown(""), c.composed.reference: None}
        name = plain(upload_name({"image": image.model_dump() if hasattr(image, "model_dump") else image}))
        return {**self.reference_shown(""), c.composed.reference: gr.update(),
                **c.composed.panel.show(Shown(info=f"Reference: your photo {name}. Say how the item you want "
                                                      f"differs."), 1)}

    def checked_upload(self, image) -> tuple:
        """A photo uploaded to Find similar: checked at once; the catalog id is cleared (one query at a time)."""
        try:
            read_upload(image)
        except Clip4CirError as e:
            warn(str(e))
            return None, ""
        return gr.update(), ""

    @staticmethod
    def clicked(ids: list[str], evt: gr.SelectData) -> str:
        return ids[evt.index]

    # ---- image and text search --------------------------------------------------------------------------------
    def run_image(self, image, image_id, category, k) -> Shown:
        image_id = (image_id or "").strip()
        return self.shown(lambda: self.engine.image_search(None if image_id else read_upload(image), int(k),
                                                           category, image_id or None),
                          used=self.used(image_id, None if image_id else image))

    def image(self, image, image_id, category, k) -> dict:
        """Items like the photo or the catalog item (the photo cleared when an id was used: one query at a time)."""
        shown = self.run_image(image, image_id, category, k)
        cleared = {self.ui.image.photo: None} if (image_id or "").strip() else {}
        return {**self.ui.image.panel.show(shown, int(k)), **cleared}

    def image_more(self, image, image_id, category, k, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        return self.ui.image.panel.show(self.run_image(image, image_id, category, total), total)

    def similar(self, image, reference_id, category, k) -> dict:
        """More like the composed tab's reference, in the Find similar tab (so it has an address)."""
        c, reference_id = self.ui, (reference_id or "").strip()
        category = category if category in self.choices.reference_values else self.choices.defaults["image"]
        shown = self.run_image(image, reference_id, category, k)
        photo = None if reference_id or shown.failed else uploaded_path(image)
        return {**c.image.panel.show(shown, int(k)), c.tabs: gr.Tabs(selected="image"), c.image.photo: photo,
                c.image.item_id: reference_id, c.image.category: category, c.image.k: int(k)}

    def run_text(self, caption, category, k) -> Shown:
        return self.shown(lambda: self.engine.text_search(caption, int(k), category))

    def text(self, caption, category, k) -> dict:
        return self.ui.text.panel.show(self.run_text(caption, category, k), int(k))

    def text_more(self, caption, category, k, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        return self.ui.text.panel.show(self.run_text(caption, category, total), total)

    # ---- opening the page -------------------------------------------------------------------------------------
    def restore(self, steps, request: gr.Request) -> dict:
        """Open the page at its address: the search it holds is run again (a shared link, a reload, the browser's
        Back), with the steps up to it; with no search, the example is ready on the first screen. A parameter
        that cannot be used is named in the tab's message line (the search runs with the rest when it can)."""
        c = self.ui
        link = read_link(dict(request.query_params) if request is not None else {}, self.choices, self.index)
        steps = self.checked_steps(steps)
        out = dict(zip(c.composed.browser.outputs, self.browse(ALL[1], 0, 0, ""), strict=True))
        if link.ok and link.tab:
            out.update({"text": self.open_text, "image": self.open_image, "composed": self.open_composed}[link.tab](
                link, steps))
        if c.composed.reference_id not in out:  # no composed search restored
            out.update(self.first_screen(steps if link.tab in ("text", "image") else []))
        if link.problems:
            panel = {"text": c.text.panel, "image": c.image.panel}.get(link.tab, c.composed.panel)
            if link.tab in ("text", "image", "composed"):
                out[c.tabs] = gr.Tabs(selected=link.tab)
            out[panel.info] = "⚠️ This link cannot be used as it is: " + "; ".join(plain(p) for p in link.problems)
        return out

    def open_text(self, link: Link, steps: list[dict]) -> dict:
        t = self.ui.text
        return {self.ui.tabs: gr.Tabs(selected="text"), t.query: link.query, t.category: link.category,
                t.k: min(link.k, MAX_RESULTS), **self.text(link.query, link.category, link.k)}

    def open_image(self, link: Link, steps: list[dict]) -> dict:
        i = self.ui.image
        return {self.ui.tabs: gr.Tabs(selected="image"), i.item_id: link.ref, i.category: link.category,
                i.k: min(link.k, MAX_RESULTS), **self.image(None, link.ref, link.category, link.k)}

    def open_composed(self, link: Link, steps: list[dict]) -> dict:
        """A link's composed search, with the steps up to it (a reload, the browser's Back) or after them (a link
        opened here); past the slider's end when "More results" went there."""
        step = {"ref": link.ref, "image": None, "caption": link.query, "category": link.category,
                "k": min(link.k, MAX_RESULTS), "mode": link.mode}
        at = max((i for i, s in enumerate(steps) if same_step(s, step)), default=None)
        out = self.show_step(steps[:at + 1] if at is not None else (steps + [step])[-MAX_STEPS:])
        if link.k > MAX_RESULTS:
            out.update(self.composed_more(None, link.query, link.category, link.k - MORE, link.mode, link.ref,
                                          out[self.ui.composed.target_id], [None] * (link.k - MORE)))
        return out

    def first_screen(self, steps: list[dict]) -> dict:
        """The example, ready to search: a catalog reference with a change written for it (for an image-only
        encoder, a catalog item to find more like); the steps kept."""
        c, example = self.ui, self.example()
        if example is None:
            return self.steps_shown(steps)
        item_id, caption, target = example
        if not self.choices.words:
            return {c.image.item_id: item_id, c.image.panel.info: f"An example, ready to search: "
                    f"{plain(self.name(item_id))} ({plain(item_id)}). Press Search, or upload a photo.",
                    **self.steps_shown(steps)}
        out = self.reference_shown(item_id, steps)
        suggestions = out[c.composed.suggestions]
        if caption in (suggestions.get("choices") or []):
            suggestions["value"] = caption
        info = (f"An example, ready to search: {plain(self.name(item_id))} ({plain(item_id)}) and a change "
                f"{'written for it' if target else 'to try'}. Press Search, or pick another reference.")
        return {**out, c.composed.caption: caption, c.composed.target_id: target, c.composed.panel.info: info}


def about(engine: SearchEngine) -> str:
    """What the index is, in the words a researcher wants: model, Combiner, index kind and settings, sizes."""
    index = engine.index
    source = index.source.get("data", {})
    lines = [
        f"- **Model**: {plain(engine.encoder.describe())}",
        f"- **Combiner**: {'loaded' if engine.combiner else 'none (simple sum only)'}",
        f"- **Zero-shot φ**: {'loaded (' + plain(engine.phi.describe()) + ')' if engine.phi else 'none'}",
        f"- **Index**: {plain(index.kind)}, metric {index.metric}, {len(index):,} items, "
        f"{len(index.categories())} categories" + (", exact search" if not index.tuning else ""),
        f"- **Store**: {plain(index.describe_store())}",
        f"- **Data**: {plain(str(source.get('kind', '?')))} ({plain(Path(str(source.get('data', '?'))).name)})",
    ]
    if index.tuning:
        lines.append(f"- **Search effort**: {plain(describe_tuning(index.tuning))}")
    lines.append(f"- **Queries encoded with**: {plain(engine.runtime_note)}")
    return "\n".join(lines)


def build_app(engine: SearchEngine, thumbnails: Thumbnails) -> gr.Blocks:
    """The page and the API over one search engine."""
    return App(engine, thumbnails).build(about(engine))


def serve(engine: SearchEngine, cache: str | os.PathLike, host: str | None = None, port: int | None = None,
          share: bool = False, quiet: bool = False) -> gr.Blocks:
    """Build the app for ``engine`` and start serving it (without blocking). Gradio's file route serves only its
    uploads and ``allowed_paths``: the thumbnails folder alone (JPEGs this app wrote); catalog images are served
    by id through clip4cir.serving.catalog_routes, wherever the catalog lives, and no other file of a catalog folder."""
    thumbnails = thumbnails_for(engine.index, Path(cache))
    thumbnails.folder.mkdir(parents=True, exist_ok=True)
    app = build_app(engine, thumbnails)
    app.queue(default_concurrency_limit=4)
    configure_serving_threads()
    app.launch(server_name=host, server_port=port, share=share, show_error=False, prevent_thread_lock=True,
               allowed_paths=[str(thumbnails.folder)], max_file_size=MAX_UPLOAD, quiet=quiet,
               head=HEAD,
               app_kwargs={"docs_url": None, "openapi_url": None, "redoc_url": None})
    add_catalog_routes(app.app, engine.index, thumbnails)
    add_http_api(app.app, engine)
    add_clip_retrieval_api(app.app, engine)
    return app


__all__ = ["App", "build_app", "serve", "plain", "MAX_K"]
