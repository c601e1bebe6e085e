"""The Gradio app: composed, image and text search over one search engine, a catalog browser to pick a
reference, and one API endpoint per action.

Layout: the query on the left and the results on the right (the catalog browser below them) on a wide screen,
one column on a phone; result grids grow with the page (no boxes that scroll inside it) and "More results" goes
past the slider's 50. The first screen holds a ready example: an annotated catalog item and a change written for
it. The page address holds each search (composed, image by id, text), so a link reproduces it and the browser's
Back goes to the previous one; the steps of a refinement (each composed search) are kept in the tab's session
storage, so the app's Back, which shows the previous step's results at once, survives a reload.

Each result shows its title (when the catalog has titles) and how well it fits in words (a match level
calibrated on the catalog's known right answers: clip4cir.retrieval.match_levels); a notice says when nothing
fits. The catalog picker (search by name or id, any case) sits with the query, above the results; choosing a new
reference clears what belonged to the old one. A bad link parameter is named in the message line.

The named API for programmatic clients is clip4cir.serving.api; uploads are read by clip4cir.serving.uploads,
the steps are checked by clip4cir.serving.steps; the page's style is static/app.css.
"""
from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import dataclass, field  # noqa: E402

import gradio as gr  # noqa: E402

from clip4cir.core.errors import Clip4CirError, SearchError, shown  # noqa: E402
from clip4cir.retrieval.search import DEFAULT_CATEGORY, MAX_K, NOTHING_FITS, SearchEngine, SearchResult  # noqa: E402
from clip4cir.retrieval.threads import configure_serving_threads  # noqa: E402
from clip4cir.retrieval.tuning import describe_tuning  # noqa: E402
from clip4cir.serving.api import add_named_api  # noqa: E402
from clip4cir.serving.catalog_routes import add_catalog_routes  # noqa: E402
from clip4cir.serving.http_api import add_http_api  # noqa: E402
from clip4cir.serving.service import thumbnails_for  # noqa: E402
from clip4cir.serving.thumbnails import Thumbnails  # noqa: E402
from clip4cir.serving.steps import MAX_STEPS, clean_steps, same_step, step_label, upload_name  # noqa: E402
from clip4cir.serving.uploads import read_upload, uploaded_path  # noqa: E402

MAX_RESULTS = 50  # the slider's end; "More results" goes on to MAX_K
MORE = 24  # results "More results" adds
PAGE = 24  # items per page of the catalog browser
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads; load_image refuses more than 50 megapixels
MODES = [("Fused (Combiner)", "combiner"), ("Simple sum", "sum"), ("Zero-shot (no triplets)", "phi")]
ALL = ("All categories", "all")
REFERENCE = ("The reference's, or the one the change names", "reference")
GUESS = ("Guess from the query", "auto")
EXAMPLE_CAPTION = "is darker"  # the first screen's change when the catalog has no annotated ones
SCORE_HELP = ("Each result says how well it fits: a strong, good or weak match, against the scores the catalog's "
              "known right answers get. When even the first fits poorly, a notice says so.")
TARGET_HELP = " ★ marks the item the catalog's annotators meant for that change."
WARNING_SECONDS = 6  # how long a warning stays
STEPS_KEY = "clip4cir-steps"  # the session storage entry holding the steps
log = logging.getLogger("clip4cir.ui")

# the page's style, in the head as it is: Gradio would scope a css= argument to its main column, where its
# warnings (and the body's dark-mode class) are not
CSS = (Path(__file__).parent / "static" / "app.css").read_text(encoding="utf-8")
# the browser's Back reloads the page at the previous address, which restores that search; the page opens at
# its top, not at a scroll position from before the reload; each tile of a grid is named by its caption (its id
# and title) instead of Gradio's "Thumbnail 1 of 12", for screen readers
HEAD = ("<script>history.scrollRestoration = 'manual';"
        "window.addEventListener('popstate', () => window.location.reload());"
        "new MutationObserver(() => document.querySelectorAll('.thumbnail-item').forEach(b => {"
        " const c = b.querySelector('.caption-label'); const name = c && c.innerText.split('\\n').slice(0, 2)"
        ".join(', '); if (name && b.getAttribute('aria-label') !== name) b.setAttribute('aria-label', name); }))"
        ".observe(document.documentElement, {subtree: true, childList: true, characterData: true});</script>")
# after a reference is picked: it and the caption box in view, the caption focused for typing the change
FOCUS_CAPTION = """() => setTimeout(() => { const r = document.getElementById("reference");
    if (r) r.scrollIntoView({block: "start"});
    const c = document.querySelector("#caption textarea"); if (c) c.focus({preventScroll: true}); }, 50)"""
LOAD_STEPS = f"""(steps) => {{ try {{ return [JSON.parse(sessionStorage.getItem("{STEPS_KEY}") || "[]")]; }}
    catch (e) {{ return [[]]; }} }}"""
SAVE_STEPS = f"""(steps) => {{ sessionStorage.setItem("{STEPS_KEY}", JSON.stringify(steps || [])); }}"""


def plain(text: str) -> str:
    """Text from a user or a file name made inert in Markdown: HTML escaped and the marks that format inline text
    backslashed, so ``<img src=x>``, ``# big`` or ``*bold*`` show as typed (it never starts a line here)."""
    return re.sub(r"([\\`*_\[\]#!|~])", r"\\\1", html.escape(text, quote=False))


def scroll_to(*elem_ids: str) -> str:
    """Browser code that brings the first shown results gallery among ``elem_ids`` into view, rank 1 first, when it
    is not (after a search started further down the page, after a link or Back restored a search, on a phone)."""
    return f"""() => setTimeout(() => {{ const el = {list(elem_ids)}.map(i => document.getElementById(i))
        .find(e => e && e.offsetParent !== null && e.querySelector(".grid-container img"));
        if (!el) return; const top = el.getBoundingClientRect().top;
        if (top < 0 || top > window.innerHeight - 100) el.scrollIntoView({{block: "start"}}); }}, 50)"""


def address(tab: str, names: Sequence[str], push: bool = True, steps: bool = False) -> str:
    """Browser code run after a search: the query (the event's inputs, named ``names``) into the page address, as
    a new history entry (``push``) or in place of the current one, when its first part is given (a search from an
    uploaded photo cannot be a link); with ``steps``, its last input, the steps, into session storage."""
    args = ", ".join(list(names) + (["steps"] if steps else []))
    fields = ", ".join(f'{n}: String({n} ?? "")' for n in names)
    save = f'sessionStorage.setItem("{STEPS_KEY}", JSON.stringify(steps || []));' if steps else ""
    method = "pushState" if push else "replaceState"
    return f"""({args}) => {{ {save} if (!{names[0]}) return;
        const query = new URLSearchParams({{tab: "{tab}", {fields}}});
        if (window.location.search !== "?" + query) window.history.{method}(null, "", "?" + query); }}"""


def no_suggestions() -> dict:
    """The suggested-captions control emptied and hidden (a reference without annotated captions, or none)."""
    return gr.update(choices=[], value=None, visible=False)


def warn(message: str) -> None:
    """One short warning (it never stays long enough to follow the user elsewhere)."""
    gr.Warning(html.escape(message), duration=WARNING_SECONDS)


@dataclass
class Shown:
    """What a search puts on the page: the results gallery, the message line, the ids of the results (for clicks);
    ``failed``: the query was refused (the message says why)."""

    gallery: list = field(default_factory=list)
    info: str = ""
    hits: list = field(default_factory=list)
    failed: bool = False


@dataclass
class Panel:
    """A tab's results: the message line, the gallery (hidden while empty), "More results" and the ids shown."""

    info: gr.Markdown
    gallery: gr.Gallery
    more: gr.Button
    hits: gr.State
    count: gr.Number  # how many are shown (hidden): the page address's k after "More results"

    @property
    def outputs(self) -> list:
        return [self.info, self.gallery, self.more, self.hits, self.count]

    def show(self, shown: Shown, k: int) -> dict:
        """The panel's updates for a search that asked for ``k`` results ("More results" when there may be more);
        no item is left highlighted from an earlier grid."""
        return {self.info: shown.info, self.gallery: gr.update(value=shown.gallery, visible=bool(shown.gallery),
                                                               selected_index=None),
                self.more: gr.update(visible=len(shown.hits) == k < MAX_K), self.hits: shown.hits,
                self.count: len(shown.hits)}


def results_panel(tab: str, explanation: str = SCORE_HELP) -> Panel:
    """A tab's results column content: what the score means, the message line, whole items (contain, not cover)
    in a grid that grows with the page, no pop-up preview (a click makes the item the next query) and no
    download button."""
    gr.Markdown(explanation, elem_classes=["score-help"])
    info = gr.Markdown(elem_id=f"{tab}-info")
    gallery = gr.Gallery(label="Results (click one to change it next)", columns=4, height="auto",
                         allow_preview=False, object_fit="contain", buttons=[], visible=False,
                         elem_id=f"{tab}-results", elem_classes=["results"])
    more = gr.Button("More results", size="sm", visible=False, elem_id=f"{tab}-more")
    return Panel(info, gallery, more, gr.State([]), gr.Number(0, visible=False, label="Results shown",
                                                             elem_id=f"{tab}-count"))


def search_options(tab: str, categories: list, default: str) -> tuple[gr.Dropdown, gr.Slider]:
    """A search tab's category and number of results, below its Search button (element ids TAB-...)."""
    return (gr.Dropdown(categories, value=default, label="Category", elem_id=f"{tab}-category"),
            gr.Slider(1, MAX_RESULTS, value=12, step=1, label="Number of results", elem_id=f"{tab}-k"))


class App:
    """The app's state and actions over one engine; :meth:`build` lays out the page."""

    def __init__(self, engine: SearchEngine, thumbnails: Thumbnails):
        self.engine, self.thumbnails = engine, thumbnails
        self.index = engine.index
        self.categories = self.index.categories()
        self.suggested = self.index.captions
        self.titles = self.index.titles
        self.modes = [(label, value) for label, value in MODES if (value != "combiner" or engine.combiner is not None)
                      and (value != "phi" or engine.phi is not None)]
        self.mode_names = {value: label for label, value in self.modes}
        self.words = engine.encoder.has_text  # an image-only encoder (learned from labels) finds similar items
        named = [(c, c) for c in self.categories]
        guess = [GUESS] if self.index.probe is not None else []
        self.reference_categories = [REFERENCE, ALL] + guess + named if named else [ALL]
        self.text_categories = [ALL] + guess + named
        self.reference_values = {value for _, value in self.reference_categories}
        self.text_values = {value for _, value in self.text_categories}
        self.defaults = {kind: value if value in self.reference_values | self.text_values else ALL[1]
                         for kind, value in DEFAULT_CATEGORY.items()}  # the engine's and the JSON API's

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
        c, item_id = self.c, (item_id or "").strip()
        if item_id and item_id not in self.index:
            warn(f"no item {shown_id(item_id)} in this catalog; try the catalog's search by name or id")
            return {c["reference"]: None, c["reference_id"]: item_id, c["suggestions"]: no_suggestions(),
                    c["target_id"]: ""}
        captions = [caption for caption, _ in self.suggested.get(item_id, [])]
        info = (f"Reference: {plain(self.name(item_id))} ({plain(item_id)}). Say how the item you want differs."
                if item_id else "")
        return {c["reference"]: self.thumbnails.large(item_id) if item_id else None, c["reference_id"]: item_id,
                c["suggestions"]: gr.update(choices=captions, value=None, visible=bool(captions)),
                c["target_id"]: "", c["caption"]: "", c["comparison"]: "",
                **c["composed_panel"].show(Shown(info=info), 1),
                **self.steps_shown(steps or [])}

    def example(self) -> tuple[str, str, str] | None:
        """The first screen's example: an annotated item with its first written change and that change's target,
        or any item with a generic change; None for an empty catalog."""
        for item_id, captions in self.suggested.items():
            if item_id in self.index and captions:
                return item_id, captions[0][0], captions[0][1]
        some = self.index.ids(1)
        return (some[0], EXAMPLE_CAPTION, "") if some else None

    # ---- the page ---------------------------------------------------------------------------------------------
    def build(self, about: str) -> gr.Blocks:
        with gr.Blocks(title="Composed image retrieval") as page:
            gr.Markdown("# Composed image retrieval\nPick or upload a reference item, say how the item you want "
                        "differs, and search the catalog." if self.words else
                        "# Image search\nUpload a photo or give a catalog id, and find the items most like it.",
                        elem_id="header")
            steps = gr.JSON([], visible=False, label="Steps")
            with gr.Tabs(elem_id="tabs", selected="composed" if self.words else "image") as tabs:
                with gr.Tab("Change an item", id="composed", elem_id="tab-composed", visible=self.words):
                    with gr.Row(elem_id="composed-layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300, elem_id="query-column"):
                            reference = gr.Image(label="Reference item", type="filepath",
                                                 sources=["upload", "webcam", "clipboard"], height=220,
                                                 elem_id="reference")
                            reference_id = gr.Textbox(label="Catalog id of the reference", elem_id="reference-id",
                                                      info="Type an id and press Enter, pick an item from the "
                                                           "catalog below, or upload a photo")
                            suggestions = gr.Radio([], label="Changes written for this item (click one)",
                                                   visible=False, elem_id="suggestions")
                            caption = gr.Textbox(label="How should it differ?", elem_id="caption",
                                                 placeholder="is red with shorter sleeves",
                                                 info="Press Enter to search")
                            search = gr.Button("Search", variant="primary", elem_id="composed-search")
                            with gr.Row():
                                back = gr.Button("Back to the previous step", size="sm", interactive=False,
                                                 elem_id="back")
                                similar = gr.Button("More like the reference", size="sm", elem_id="similar")
                                compare = gr.Button("Compare the ways to combine", size="sm", elem_id="compare",
                                                    visible=len(self.modes) > 1)
                            trail = gr.Radio([], label="Steps (click one to go back to it)", visible=False,
                                             interactive=True, elem_id="steps-trail")
                            category, k = search_options("composed", self.reference_categories,
                                                         self.defaults["composed"])
                            mode = gr.Radio(self.modes, value=self.modes[0][1], label="How to combine picture and "
                                            "words", elem_id="mode", info="Fused: a trained network merges them "
                                                                          "(best); simple sum: their features added"
                                            + ("; zero-shot: the picture as a word in the sentence"
                                               + (", plus the simple sum" if self.engine.phi.sum_weight else "")
                                               if self.engine.phi is not None else ""))
                            target_id = gr.Textbox(visible=False, label="Known target")
                            with gr.Accordion("Pick a reference from the catalog", open=True, elem_id="browser"):
                                with gr.Row():
                                    browse_category = gr.Dropdown([ALL] + [(c, c) for c in self.categories],
                                                                  value=ALL[1], label="Browse category",
                                                                  elem_id="browse-category")
                                    lookup = gr.Textbox(label="Find by name or id", elem_id="lookup",
                                                        placeholder="e.g. red dress", info="Press Enter to find")
                                with gr.Row():
                                    shuffle = gr.Button("Shuffle", size="sm", elem_id="shuffle")
                                    previous_page = gr.Button("Previous page", size="sm", elem_id="previous")
                                    next_page = gr.Button("Next page", size="sm", elem_id="next")
                                page_label = gr.Markdown(elem_id="page-label")
                                browse_gallery = gr.Gallery(label="Catalog items (click one to use it as the "
                                                            "reference)", columns=4, height="auto",
                                                            allow_preview=False, object_fit="contain", buttons=[],
                                                            elem_id="browse")
                        with gr.Column(scale=3, min_width=300, elem_id="composed-results-column"):
                            composed_panel = results_panel("composed", SCORE_HELP + TARGET_HELP)
                            comparison = gr.Markdown(elem_id="comparison")
                    page_number, seed, browse_ids = gr.State(0), gr.State(0), gr.State([])
                with gr.Tab("Find similar", id="image", elem_id="tab-image"):
                    with gr.Row(elem_id="image-layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300):
                            query_image = gr.Image(label="Query photo", type="filepath",
                                                   sources=["upload", "webcam", "clipboard"], height=240,
                                                   elem_id="query-image")
                            image_id = gr.Textbox(label="Or a catalog id", elem_id="image-id",
                                                  info="Press Enter to find items like it (a photo is then "
                                                       "cleared: one query at a time)")
                            image_search = gr.Button("Search", variant="primary", elem_id="image-search")
                            image_category, image_k = search_options("image", self.reference_categories,
                                                                     self.defaults["image"])
                        with gr.Column(scale=3, min_width=300):
                            image_panel = results_panel("image")
                with gr.Tab("Describe it", id="text", elem_id="tab-text", visible=self.words):
                    with gr.Row(elem_id="text-layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300):
                            text = gr.Textbox(label="Description", placeholder="a red striped dress with long "
                                              "sleeves", info="Press Enter to search", elem_id="text")
                            text_search = gr.Button("Search", variant="primary", elem_id="text-search")
                            text_category, text_k = search_options("text", self.text_categories,
                                                                   self.defaults["text"])
                        with gr.Column(scale=3, min_width=300):
                            text_panel = results_panel("text")
            with gr.Accordion("About this index", open=False, elem_id="about"):
                gr.Markdown(about)
            add_named_api(self.engine)
            self._wire({name: value for name, value in locals().items()
                        if isinstance(value, (gr.Blocks, gr.State, Panel)) or hasattr(value, "_id")})
        return page

    def _wire(self, c: dict) -> None:
        """The events of the page, given its components by name (none is an API endpoint: see serving.api)."""
        self.c = c
        private = {"api_visibility": "private"}
        composed, image, text = c["composed_panel"], c["image_panel"], c["text_panel"]
        self.composed_outputs = composed.outputs + [c["steps"], c["trail"], c["back"], c["comparison"]]
        composed_inputs = [c["reference"], c["caption"], c["category"], c["k"], c["mode"], c["reference_id"],
                           c["target_id"], c["steps"]]
        composed_address = ([c["reference_id"], c["caption"], c["category"], c["k"], c["mode"], c["steps"]],
                            ["ref", "caption", "category", "k", "mode"])
        for trigger in (c["search"].click, c["caption"].submit):
            trigger(self.composed, composed_inputs, self.composed_outputs, preprocess=False, **private).then(
                None, composed_address[0], js=address("composed", composed_address[1], steps=True)).then(
                None, js=scroll_to("composed-results"))
        composed.more.click(self.composed_more, composed_inputs[:-1] + [composed.hits], composed.outputs,
                            preprocess=False, **private).then(
            None, [c["reference_id"], c["caption"], c["category"], composed.count, c["mode"]],
            js=address("composed", ["ref", "caption", "category", "k", "mode"], push=False))
        c["compare"].click(self.compare, composed_inputs[:-1], c["comparison"], preprocess=False, **private)
        self.step_outputs = [c[name] for name in ("reference", "reference_id", "caption", "category", "k", "mode",
                                                  "suggestions", "target_id")] + self.composed_outputs
        c["back"].click(self.step_back, c["steps"], self.step_outputs, **private).then(
            None, composed_address[0], js=address("composed", composed_address[1], push=False, steps=True)).then(
            None, js=scroll_to("composed-results"))
        c["trail"].select(self.step_to, c["steps"], self.step_outputs, **private).then(
            None, composed_address[0], js=address("composed", composed_address[1], push=False, steps=True)).then(
            None, js=scroll_to("composed-results"))
        self.pick_outputs = [c[name] for name in ("reference", "reference_id", "suggestions", "target_id",
                                                  "caption")] + self.composed_outputs
        c["reference"].upload(self.uploaded, c["reference"], self.pick_outputs, preprocess=False, **private)
        c["reference"].clear(lambda: self.reference_shown(""), None, self.pick_outputs, **private)
        c["reference_id"].submit(self.reference_shown, c["reference_id"], self.pick_outputs, **private).then(
            None, js=FOCUS_CAPTION)
        c["suggestions"].select(self.suggest, [c["reference_id"], c["suggestions"]], [c["caption"], c["target_id"]],
                                **private)
        browse_outputs = [c["browse_gallery"], c["browse_ids"], c["page_label"]]
        browse_inputs = [c["browse_category"], c["page_number"], c["seed"], c["lookup"]]
        c["browse_category"].change(lambda *a: self.browse(a[0], 0, a[2], a[3]) + (0,), browse_inputs,
                                    browse_outputs + [c["page_number"]], **private)
        c["lookup"].submit(lambda *a: self.browse(a[0], 0, a[2], a[3]) + (0,), browse_inputs,
                           browse_outputs + [c["page_number"]], **private)
        c["shuffle"].click(lambda cat, p, s, look: self.browse(cat, 0, s + 1, "") + (0, s + 1), browse_inputs,
                           browse_outputs + [c["page_number"], c["seed"]], **private)
        c["next_page"].click(lambda cat, p, s, look: self.browse(cat, p + 1, s, look) + (p + 1,), browse_inputs,
                             browse_outputs + [c["page_number"]], **private)
        c["previous_page"].click(lambda cat, p, s, look: self.browse(cat, max(p - 1, 0), s, look)
                                 + (max(p - 1, 0),), browse_inputs, browse_outputs + [c["page_number"]], **private)
        c["browse_gallery"].select(self.pick_from, c["browse_ids"], self.pick_outputs, **private).then(
            None, js=FOCUS_CAPTION)
        # a result, in any tab, becomes the reference of the next composed search (the trail goes on)
        for panel in (composed, image, text) if self.words else ():
            panel.gallery.select(self.refine, [panel.hits, c["steps"]], self.pick_outputs + [c["tabs"]],
                                 **private).then(None, js=FOCUS_CAPTION)
        image_inputs = [c["query_image"], c["image_id"], c["image_category"], c["image_k"]]
        image_address = ([c["image_id"], c["image_category"], c["image_k"]], ["ref", "category", "k"])
        if not self.words:
            image.gallery.select(self.clicked, image.hits, c["image_id"], **private).then(
                self.image, image_inputs, image.outputs + [c["query_image"]], preprocess=False, **private).then(
                None, image_address[0], js=address("image", image_address[1]))
        c["query_image"].upload(self.checked_upload, c["query_image"], [c["query_image"], c["image_id"]],
                                preprocess=False, **private)
        for trigger in (c["image_search"].click, c["image_id"].submit):
            trigger(self.image, image_inputs, image.outputs + [c["query_image"]], preprocess=False,
                    **private).then(None, image_address[0], js=address("image", image_address[1])).then(
                None, js=scroll_to("image-results"))
        image.more.click(self.image_more, image_inputs + [image.hits], image.outputs, preprocess=False,
                         **private).then(None, [c["image_id"], c["image_category"], image.count],
                                         js=address("image", ["ref", "category", "k"], push=False))
        c["similar"].click(self.similar, [c["reference"], c["reference_id"], c["category"], c["k"]],
                           image.outputs + [c["tabs"], c["query_image"], c["image_id"], c["image_category"],
                                            c["image_k"]], preprocess=False, **private).then(
            None, image_address[0], js=address("image", image_address[1])).then(None, js=scroll_to("image-results"))
        text_inputs = [c["text"], c["text_category"], c["text_k"]]
        for trigger in (c["text_search"].click, c["text"].submit):
            trigger(self.text, text_inputs, text.outputs, **private).then(
                None, text_inputs, js=address("text", ["q", "category", "k"])).then(None, js=scroll_to("text-results"))
        text.more.click(self.text_more, text_inputs + [text.hits], text.outputs, **private).then(
            None, [c["text"], c["text_category"], text.count], js=address("text", ["q", "category", "k"], push=False))
        self.restore_outputs = list(dict.fromkeys(
            self.step_outputs + self.pick_outputs + image.outputs + text.outputs + browse_outputs
            + [c[name] for name in ("tabs", "query_image", "image_id", "image_category", "image_k", "text",
                                    "text_category", "text_k")]))
        c["page"].load(self.restore, c["steps"], self.restore_outputs, js=LOAD_STEPS, **private).then(
            None, c["steps"], js=SAVE_STEPS).then(None, js=scroll_to("composed-results", "image-results",
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
        return next((rank for rank, h in enumerate(result.hits, 1) if h.id == target_id), None)

    def composed(self, image, caption, category, k, mode, reference_id, target_id, steps) -> dict:
        """A composed search; a new step of the refinement when it found something (a repeat only updates k)."""
        shown = self.run_composed(image, caption, category, k, mode, reference_id, target_id)
        steps = self.checked_steps(steps)
        step = {"ref": (reference_id or "").strip(), "image": None if reference_id else image,
                "caption": caption or "", "category": category, "k": int(k), "mode": mode}
        if not shown.failed:
            steps = (steps[:-1] if steps and same_step(steps[-1], step) else steps) + [step]
        return {**self.c["composed_panel"].show(shown, int(k)), **self.steps_shown(steps[-MAX_STEPS:])}

    def composed_more(self, image, caption, category, k, mode, reference_id, target_id, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        shown = self.run_composed(image, caption, category, total, mode, reference_id, target_id)
        return self.c["composed_panel"].show(shown, total)

    def compare(self, image, caption, category, k, mode, reference_id, target_id) -> str:
        """The same query in every way of combining picture and words, side by side: the first five of each and,
        for an annotated example, where the known target ranks."""
        reference_id = (reference_id or "").strip()
        rows = []
        for label, value in self.modes:
            try:
                result = self.engine.composed_search(caption, None if reference_id else read_upload(image),
                                                     reference_id or None, min(int(k), 5), category, value)
            except Clip4CirError as e:
                return f"⚠️ {plain(str(e))}"
            rank = self.target_rank(caption, reference_id, category, value, target_id) if target_id and \
                reference_id else None
            first = "; ".join(plain(self.name(h.id)) + (" ★" if h.id == target_id else "") for h in result.hits)
            rows.append(f"| {label} | {first} | {rank if rank else '-'} |")
        return "\n".join([f"**“{plain(caption or '')}”, each way:**", "", "| way | first results | ★ rank |",
                          "|---|---|---|", *rows])

    def steps_shown(self, steps: list[dict]) -> dict:
        """The steps kept, the trail (each step clickable) and whether Back can go anywhere."""
        c = self.c
        labels = [(step_label(n, s, self.mode_names), n - 1) for n, s in enumerate(steps, 1)]
        return {c["steps"]: steps, c["back"]: gr.update(interactive=len(steps) > 1),
                c["trail"]: gr.update(choices=labels, value=len(steps) - 1 if steps else None,
                                      visible=len(steps) > 1)}

    def checked_steps(self, steps) -> list[dict]:
        return clean_steps(steps, lambda i: i in self.index, self.reference_values, self.mode_names, MAX_RESULTS)

    def show_step(self, steps: list[dict]) -> dict:
        """The last step of ``steps`` on the page: its query in the controls and its results, searched again."""
        c, step = self.c, steps[-1]
        if step["ref"]:
            shown_reference = self.reference_shown(step["ref"], steps)
            image, suggestions = shown_reference[c["reference"]], shown_reference[c["suggestions"]]
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
        return {c["reference"]: image, c["reference_id"]: step["ref"], c["caption"]: step["caption"],
                c["category"]: step["category"], c["k"]: step["k"], c["mode"]: step["mode"],
                c["suggestions"]: suggestions, c["target_id"]: target, c["comparison"]: "",
                **c["composed_panel"].show(shown, step["k"]), **self.steps_shown(steps)}

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
                self.c["tabs"]: gr.Tabs(selected="composed")}

    def uploaded(self, image) -> dict:
        """A photo uploaded as the reference: checked at once (a file that is not an image is refused now, not at
        Search); a new trail starts."""
        c = self.c
        try:
            read_upload(image)
        except Clip4CirError as e:
            warn(str(e))
            return {**self.reference_shown(""), c["reference"]: None}
        name = plain(upload_name({"image": image.model_dump() if hasattr(image, "model_dump") else image}))
        return {**self.reference_shown(""), c["reference"]: gr.update(),
                **c["composed_panel"].show(Shown(info=f"Reference: your photo {name}. Say how the item you want "
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
        cleared = {self.c["query_image"]: None} if (image_id or "").strip() else {}
        return {**self.c["image_panel"].show(shown, int(k)), **cleared}

    def image_more(self, image, image_id, category, k, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        return self.c["image_panel"].show(self.run_image(image, image_id, category, total), total)

    def similar(self, image, reference_id, category, k) -> dict:
        """More like the composed tab's reference, in the Find similar tab (so it has an address)."""
        c, reference_id = self.c, (reference_id or "").strip()
        category = category if category in self.reference_values else self.defaults["image"]
        shown = self.run_image(image, reference_id, category, k)
        photo = None if reference_id or shown.failed else uploaded_path(image)
        return {**c["image_panel"].show(shown, int(k)), c["tabs"]: gr.Tabs(selected="image"), c["query_image"]: photo,
                c["image_id"]: reference_id, c["image_category"]: category, c["image_k"]: int(k)}

    def run_text(self, caption, category, k) -> Shown:
        return self.shown(lambda: self.engine.text_search(caption, int(k), category))

    def text(self, caption, category, k) -> dict:
        return self.c["text_panel"].show(self.run_text(caption, category, k), int(k))

    def text_more(self, caption, category, k, hits) -> dict:
        total = min(len(hits or []) + MORE, MAX_K)
        return self.c["text_panel"].show(self.run_text(caption, category, total), total)

    # ---- opening the page -------------------------------------------------------------------------------------
    def restore(self, steps, request: gr.Request) -> dict:
        """Open the page at its address: the search it holds is run again (a shared link, a reload, the browser's
        Back), with the steps up to it; with no search, the example is ready on the first screen. A parameter
        that cannot be used is named in the tab's message line (the search runs with the rest when it can)."""
        c = self.c
        q = dict(request.query_params) if request is not None else {}
        out = dict(zip((c["browse_gallery"], c["browse_ids"], c["page_label"]), self.browse(ALL[1], 0, 0, "")))
        steps = self.checked_steps(steps)
        link = read_link(q, self)
        if link.tab == "text" and link.ok:
            out.update({c["tabs"]: gr.Tabs(selected="text"), c["text"]: link.query, c["text_category"]: link.category,
                        c["text_k"]: min(link.k, MAX_RESULTS), **self.text(link.query, link.category, link.k)})
        elif link.tab == "image" and link.ok:
            out.update({c["tabs"]: gr.Tabs(selected="image"), c["image_id"]: link.ref,
                        c["image_category"]: link.category, c["image_k"]: min(link.k, MAX_RESULTS),
                        **self.image(None, link.ref, link.category, link.k)})
        elif link.tab == "composed" and link.ok:
            step = {"ref": link.ref, "image": None, "caption": link.query, "category": link.category,
                    "k": min(link.k, MAX_RESULTS), "mode": link.mode}
            # the steps up to this one (a reload, the browser's Back), or after them (a link opened here)
            at = max((i for i, s in enumerate(steps) if same_step(s, step)), default=None)
            steps = steps[:at + 1] if at is not None else (steps + [step])[-MAX_STEPS:]
            out.update(self.show_step(steps))
            if link.k > MAX_RESULTS:  # "More results" went past the slider
                out.update(self.composed_more(None, link.query, link.category, link.k - MORE, link.mode, link.ref,
                                              out[c["target_id"]], [None] * (link.k - MORE)))
        if c["reference_id"] not in out:  # no composed search restored
            out.update(self.first_screen(steps if link.tab in ("text", "image") else []))
        if link.problems:
            panel = {"text": c["text_panel"], "image": c["image_panel"]}.get(link.tab, c["composed_panel"])
            if link.tab in ("text", "image", "composed"):
                out[c["tabs"]] = gr.Tabs(selected=link.tab)
            out[panel.info] = "⚠️ This link cannot be used as it is: " + "; ".join(plain(p) for p in link.problems)
        return out

    def first_screen(self, steps: list[dict]) -> dict:
        """The example, ready to search: a catalog reference with a change written for it (for an image-only
        encoder, a catalog item to find more like); the steps kept."""
        c, example = self.c, self.example()
        if example is None:
            return self.steps_shown(steps)
        item_id, caption, target = example
        if not self.words:
            return {c["image_id"]: item_id, c["image_panel"].info: f"An example, ready to search: "
                    f"{plain(self.name(item_id))} ({plain(item_id)}). Press Search, or upload a photo.",
                    **self.steps_shown(steps)}
        out = self.reference_shown(item_id, steps)
        suggestions = out[c["suggestions"]]
        if caption in (suggestions.get("choices") or []):
            suggestions["value"] = caption
        info = (f"An example, ready to search: {plain(self.name(item_id))} ({plain(item_id)}) and a change "
                f"{'written for it' if target else 'to try'}. Press Search, or pick another reference.")
        return {**out, c["caption"]: caption, c["target_id"]: target, c["composed_panel"].info: info}


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


def read_link(q: dict, app: App) -> Link:
    """The page address's parameters, each checked: tab, ref, caption / q, category, k (1 to the result limit;
    "More results" goes past the slider) and mode."""
    if not q:
        return Link()
    problems = []
    tab = q.get("tab", "")
    if tab not in ("composed", "image", "text") or (tab in ("composed", "text") and not app.words):
        problems.append(f"tab {shown_id(tab)} is not one of composed, image, text")
    link = Link(tab=tab, mode=app.modes[0][1], problems=problems)
    try:
        link.k = int(q.get("k", 12))
        if not 1 <= link.k <= min(MAX_K, len(app.index)):
            raise ValueError
    except ValueError:
        problems.append(f"k {shown_id(q.get('k'))} is not a number of results from 1 to "
                        f"{min(MAX_K, len(app.index)):,}")
    values = app.text_values if tab == "text" else app.reference_values
    link.category = q.get("category", app.defaults.get(tab, ALL[1]))
    if link.category not in values:
        problems.append(f"category {shown_id(link.category)} is not one of {', '.join(sorted(values))}")
    if tab in ("composed", "image"):
        link.ref = q.get("ref", "")
        if link.ref not in app.index:
            problems.append(f"ref {shown_id(link.ref)} is not an item of this catalog" if link.ref else
                            "ref (the reference's id) is missing")
    if tab == "composed":
        link.query = q.get("caption", "").strip()
        link.mode = q.get("mode", link.mode)
        if not link.query:
            problems.append("caption (the change) is empty")
        if link.mode not in app.mode_names:
            problems.append(f"mode {shown_id(link.mode)} is not one of {', '.join(app.mode_names)}")
    if tab == "text":
        link.query = q.get("q", "").strip()
        if not link.query:
            problems.append("q (the description) is empty")
    return link


def shown_id(value) -> str:
    """A value from a user, quoted and cut (an id of 100,000 characters is not echoed whole)."""
    return shown(value, 60)

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
    by id through clip4cir.catalog_routes, wherever the catalog lives, and no other file of a catalog folder."""
    thumbnails = thumbnails_for(engine.index, Path(cache))
    thumbnails.folder.mkdir(parents=True, exist_ok=True)
    app = build_app(engine, thumbnails)
    app.queue(default_concurrency_limit=4)
    configure_serving_threads()
    app.launch(server_name=host, server_port=port, share=share, show_error=False, prevent_thread_lock=True,
               allowed_paths=[str(thumbnails.folder)], max_file_size=MAX_UPLOAD, quiet=quiet,
               head=HEAD + f"<style>{CSS}</style>",
               app_kwargs={"docs_url": None, "openapi_url": None, "redoc_url": None})
    add_catalog_routes(app.app, engine.index, thumbnails)
    add_http_api(app.app, engine)
    return app


__all__ = ["App", "build_app", "serve", "plain", "MAX_K"]
