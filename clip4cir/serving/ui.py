"""The Gradio app: composed, image and text search over one search engine, a catalog browser to pick a
reference, and one API endpoint per action.

Layout: the query on the left and the results on the right on a wide screen; on a phone the results come
first and the page scrolls to them after a search. The page address holds the query (reference, caption,
category, mode, number of results), so a link reproduces a search and the browser's Back goes to the previous
one. Results show thumbnails (whole items, never cropped) with their rank, id, categories and score.

The named API for programmatic clients is clip4cir.serving.api; uploads are read by clip4cir.serving.uploads.
"""
from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import dataclass, field  # noqa: E402

import gradio as gr  # noqa: E402

from clip4cir.core.errors import SearchError  # noqa: E402
from clip4cir.retrieval.search import MAX_K, SearchEngine, SearchResult  # noqa: E402
from clip4cir.retrieval.threads import configure_serving_threads  # noqa: E402
from clip4cir.retrieval.tuning import describe_tuning  # noqa: E402
from clip4cir.serving.api import add_named_api  # noqa: E402
from clip4cir.serving.catalog_routes import add_catalog_routes  # noqa: E402
from clip4cir.serving.http_api import add_http_api  # noqa: E402
from clip4cir.serving.service import thumbnails_for  # noqa: E402
from clip4cir.serving.thumbnails import Thumbnails  # noqa: E402
from clip4cir.serving.uploads import read_upload  # noqa: E402

MAX_RESULTS = 50  # the slider's end (the API takes up to 10,000)
PAGE = 24  # items per page of the catalog browser
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads; load_image refuses more than 50 megapixels
MODES = {"Fused (Combiner)": "combiner", "Simple sum": "sum"}
ALL, GUESS = "All categories", "Guess from the query"
log = logging.getLogger("clip4cir.ui")

CSS = """
#results .grid-container, #browse .grid-container, #image-results .grid-container, #text-results .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important; }
.gallery-item img, .thumbnail-item img { object-fit: contain !important; background: #f2f2f0; }
@media (max-width: 760px) {
  #layout, #image-layout, #text-layout { flex-direction: column; }
  #results-column, #image-results-column, #text-results-column { order: -1; }
}
"""
# the browser's Back reloads the page at the previous address, which restores that search; the page opens at
# its top (where the results are), not at a scroll position from before the reload
HEAD = ("<script>history.scrollRestoration = 'manual';"
        "window.addEventListener('popstate', () => window.location.reload());</script>")


def plain(text: str) -> str:
    """Text from a user or a file name made inert in Markdown: HTML escaped and the marks that format inline text
    backslashed, so ``<img src=x>``, ``# big`` or ``*bold*`` show as typed (it never starts a line here)."""
    return re.sub(r"([\\`*_\[\]#!|~])", r"\\\1", html.escape(text, quote=False))


def scroll_to(*elem_ids: str) -> str:
    """Browser code that brings the first shown results gallery among ``elem_ids`` into view, rank 1 first, when it
    is not (after a search started further down the page, after a link or Back restored a search, on a phone)."""
    return f"""() => setTimeout(() => {{ const el = {list(elem_ids)}.map(i => document.getElementById(i))
        .find(e => e && e.offsetParent !== null && e.querySelector(".grid-container img"));
        if (!el) return; el.querySelectorAll("*").forEach(e => {{ if (e.scrollTop > 0) e.scrollTop = 0; }});
        const top = el.getBoundingClientRect().top;
        if (top < 0 || top > window.innerHeight - 100) el.scrollIntoView({{block: "start"}}); }}, 50)"""


def no_suggestions() -> dict:
    """The suggested-captions control emptied and hidden (a reference without annotated captions, or none)."""
    return gr.update(choices=[], value=None, visible=False)


def push_query(inputs: str, params: str) -> str:
    """Browser code run before a search: the query (``params``, a JavaScript object built from ``inputs``) goes
    into the page address as a new history entry when it changed; the event's ``inputs`` pass on unchanged."""
    return f"""({inputs}) => {{ const q = new URLSearchParams({params});
            if (window.location.search !== "?" + q) window.history.pushState(null, "", "?" + q);
            return [{inputs}]; }}"""


def category_value(label: str | None) -> str | None:
    return {ALL: "all", GUESS: "auto", None: "all", "": "all"}.get(label, label)


def message(result: SearchResult) -> str:
    parts = [f"{len(result.hits)} results in {1000 * result.seconds:.0f} ms"]
    if result.category:
        parts.append(f"within {plain(result.category)}")
    return " · ".join(parts + [plain(note) for note in result.notes])


def results_gallery(elem_id: str) -> gr.Gallery:
    """A tab's results column: whole items (contain, not cover), four a row on wide screens (the CSS adapts it to
    narrow ones), no pop-up preview (a click makes the item the next query)."""
    with gr.Column(scale=3, min_width=300, elem_id=f"{elem_id}-column"):
        return gr.Gallery(label="Results (click one to change it next)", columns=4, height="auto",
                          allow_preview=False, object_fit="contain", elem_id=elem_id)


def k_slider(elem_id: str) -> gr.Slider:
    return gr.Slider(1, MAX_RESULTS, value=12, step=1, label="Number of results", elem_id=elem_id)


def search_controls(tab: str, categories: list[str]) -> tuple[gr.Dropdown, gr.Slider, gr.Button, gr.Markdown]:
    """A search tab's category, number of results, Search button and message line (element ids TAB-...)."""
    return (gr.Dropdown(categories, value=ALL, label="Category", elem_id=f"{tab}-category"), k_slider(f"{tab}-k"),
            gr.Button("Search", variant="primary", elem_id=f"{tab}-search"), gr.Markdown(elem_id=f"{tab}-info"))


@dataclass
class Shown:
    """What a search puts on the page: the results gallery, the message line, the ids of the results (for clicks);
    ``failed``: the query was refused (the message says why)."""

    gallery: list = field(default_factory=list)
    info: str = ""
    hits: list = field(default_factory=list)
    failed: bool = False


class App:
    """The app's state and actions over one engine; :meth:`build` lays out the page."""

    def __init__(self, engine: SearchEngine, thumbnails: Thumbnails):
        self.engine, self.thumbnails = engine, thumbnails
        self.index = engine.index
        self.categories = self.index.categories()
        self.suggested = self.index.captions
        self.modes = list(MODES) if engine.combiner is not None else ["Simple sum"]

    # ---- results --------------------------------------------------------------------------------------------
    def gallery(self, result: SearchResult, target_id: str = "") -> list[tuple[str, str]]:
        """Thumbnails captioned with rank, id, categories and score; the known target is marked."""
        return [(self.thumbnails.small(h.id), f"{rank}. {h.id} · {', '.join(h.categories) or '-'} · {h.score:.3f}"
                 + (" · ★ target" if h.id == target_id else "")) for rank, h in enumerate(result.hits, 1)]

    # ---- the page -----------------------------------------------------------------------------------------------
    def shown(self, search, target_id: str = "") -> "Shown":
        """Run a UI search: its results shown, or, for a bad query, a warning and a message line (never a stack
        trace; the app stays up whatever happens)."""
        try:
            result = search()
        except SearchError as e:
            gr.Warning(html.escape(str(e)))
            return Shown(info=f"⚠️ {plain(str(e))}", failed=True)
        except Exception as e:
            log.exception("search failed")
            gr.Warning(html.escape(f"search failed: {e}"))
            return Shown(info=f"⚠️ search failed: {plain(str(e))}", failed=True)
        return Shown(self.gallery(result, target_id), message(result), [h.id for h in result.hits])

    def browse(self, category: str | None, page: int, seed: int, lookup: str):
        """A page of the catalog: ids found by a lookup, or a random sample (of a category); annotated items first
        on the first page, so their suggestions are one click away."""
        if lookup.strip():
            ids = self.index.find_ids(lookup.strip(), PAGE)
        else:
            name = None if category in (None, ALL) else category
            ids = self.index.sample(PAGE * (page + 1), name, seed)[PAGE * page:]
            if page == 0 and seed == 0 and name is None:
                ids = list(dict.fromkeys(list(self.suggested)[:PAGE] + ids))[:PAGE]
        items = [(self.thumbnails.small(i), i) for i in ids]
        label = f"page {page + 1}" if not lookup.strip() else f"{len(ids)} ids starting with {plain(lookup)}"
        return items, ids, label

    def pick(self, item_id: str):
        """Make a catalog item the reference: its image, its id, and its annotated captions as suggestions."""
        item_id = (item_id or "").strip()
        if item_id and item_id not in self.index:
            gr.Warning(html.escape(f"no item {item_id!r} in this catalog"))
            return gr.update(), item_id, no_suggestions(), ""
        if not item_id:
            return None, "", no_suggestions(), ""
        captions = [c for c, _ in self.suggested.get(item_id, [])]
        return (self.thumbnails.large(item_id), item_id,
                gr.update(choices=captions, value=None, visible=bool(captions)), "")

    def build(self, about: str) -> gr.Blocks:
        cats = [ALL] + ([GUESS] if self.engine.index.probe is not None else []) + self.categories
        words = self.engine.encoder.has_text  # an image-only encoder (learned from labels) finds similar items
        with gr.Blocks(title="Composed image retrieval") as page:
            gr.Markdown("# Composed image retrieval\nPick or upload a reference item, say how the item you want "
                        "differs, and search the catalog." if words else
                        "# Image search\nUpload a photo or give a catalog id, and find the items most like it.")
            history = gr.State([])
            with gr.Tabs(elem_id="tabs", selected="composed" if words else "image") as tabs:
                with gr.Tab("Change an item", id="composed", elem_id="tab-composed", visible=words):
                    with gr.Row(elem_id="layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300, elem_id="query-column"):
                            reference = gr.Image(label="Reference item", type="filepath",
                                                 sources=["upload", "webcam", "clipboard"], height=260,
                                                 elem_id="reference")
                            reference_id = gr.Textbox(label="Catalog id of the reference", elem_id="reference-id",
                                                      info="Type an id and press Enter, pick an item below, or "
                                                           "upload a photo")
                            suggestions = gr.Radio([], label="Changes written for this item (click one)",
                                                   visible=False, elem_id="suggestions")
                            caption = gr.Textbox(label="How should it differ?", elem_id="caption",
                                                 placeholder="is red with shorter sleeves",
                                                 info="Press Enter to search")
                            with gr.Row():
                                category = gr.Dropdown(cats, value=GUESS if GUESS in cats else ALL,
                                                       label="Category", elem_id="category",
                                                       info="Search one category, or let the query decide")
                                k = k_slider("k")
                            mode = gr.Radio(self.modes, value=self.modes[0], label="How to combine picture and words",
                                            elem_id="mode", info="Fused: a trained network merges them (best); "
                                                                 "simple sum: their features added")
                            target_id = gr.Textbox(visible=False, label="Known target")
                            search = gr.Button("Search", variant="primary", elem_id="composed-search")
                            info = gr.Markdown(elem_id="composed-info")
                            with gr.Row():
                                back = gr.Button("Back to the previous step", size="sm", elem_id="back")
                                similar = gr.Button("More like the reference", size="sm", elem_id="similar")
                            steps = gr.Markdown(elem_id="steps")
                        results = results_gallery("results")
                    with gr.Accordion("Browse the catalog for a reference", open=True, elem_id="browser"):
                        with gr.Row():
                            browse_category = gr.Dropdown([ALL] + self.categories, value=ALL,
                                                          label="Browse category", elem_id="browse-category")
                            lookup = gr.Textbox(label="Find by id", placeholder="start of an id", elem_id="lookup")
                        with gr.Row():
                            shuffle = gr.Button("Shuffle", size="sm", elem_id="shuffle")
                            previous_page = gr.Button("Previous page", size="sm", elem_id="previous")
                            next_page = gr.Button("Next page", size="sm", elem_id="next")
                            page_label = gr.Markdown(elem_id="page-label")
                        browse_gallery = gr.Gallery(label="Catalog items (click one to use it as the reference)",
                                                    columns=8, height="auto", allow_preview=False,
                                                    object_fit="contain", elem_id="browse")
                    page_number, seed, browse_ids = gr.State(0), gr.State(0), gr.State([])
                    composed_hits = gr.State([])
                with gr.Tab("Find similar", id="image", elem_id="tab-image"):
                    with gr.Row(elem_id="image-layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300):
                            query_image = gr.Image(label="Query image", type="filepath",
                                                   sources=["upload", "webcam", "clipboard"], height=260,
                                                   elem_id="query-image")
                            image_id = gr.Textbox(label="Or a catalog id", elem_id="image-id",
                                                  info="Press Enter to find items like it")
                            image_category, image_k, image_button, image_info = search_controls("image", cats)
                        image_results = results_gallery("image-results")
                    image_hits = gr.State([])
                with gr.Tab("Describe it", id="text", elem_id="tab-text", visible=words):
                    with gr.Row(elem_id="text-layout", equal_height=False):
                        with gr.Column(scale=2, min_width=300):
                            text = gr.Textbox(label="Description", placeholder="a red striped dress with long "
                                              "sleeves", info="Press Enter to search", elem_id="text")
                            text_category, text_k, text_button, text_info = search_controls("text", cats)
                        text_results = results_gallery("text-results")
                    text_hits = gr.State([])
            with gr.Accordion("About this index", open=False, elem_id="about"):
                gr.Markdown(about)
            add_named_api(self.engine)
            self._wire({name: value for name, value in locals().items() if isinstance(value, (gr.Blocks, gr.State))
                        or hasattr(value, "_id")})
        return page

    def _wire(self, c: dict) -> None:
        """The events of the page, given its components by name (none is an API endpoint: see serving.api)."""
        self.c = c
        private = {"api_visibility": "private"}
        composed_inputs = [c["reference"], c["caption"], c["category"], c["k"], c["mode"], c["reference_id"],
                           c["target_id"], c["history"]]
        composed_outputs = [c["results"], c["info"], c["composed_hits"], c["history"], c["steps"]]
        # the address of the page holds the query: a link reproduces it, Back goes to the previous one
        push = push_query("image, caption, category, k, mode, ref, target, history",
                          '{tab: "composed", ref: ref || "", caption: caption || "", category: category || "", '
                          'k: String(k), mode: mode || ""}')
        for trigger in (c["search"].click, c["caption"].submit):
            trigger(self.composed, composed_inputs, composed_outputs, js=push, preprocess=False,
                    **private).then(None, js=scroll_to("results"))
        c["reference"].input(lambda: ("", no_suggestions(), ""), None,
                             [c["reference_id"], c["suggestions"], c["target_id"]], **private)
        c["reference_id"].submit(self.pick, c["reference_id"],
                                 [c["reference"], c["reference_id"], c["suggestions"], c["target_id"]], **private)
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
        pick_outputs = [c["reference"], c["reference_id"], c["suggestions"], c["target_id"]]
        c["browse_gallery"].select(self.pick_from, c["browse_ids"], pick_outputs, **private)
        image_inputs = [c["query_image"], c["image_id"], c["image_category"], c["image_k"]]
        image_outputs = [c["image_results"], c["image_info"], c["image_hits"]]
        if not self.engine.encoder.has_text:  # a result is the next query: more like this
            c["image_results"].select(self.clicked, c["image_hits"], c["image_id"], **private).then(
                lambda *a: self.image(None, *a[1:]), image_inputs, image_outputs, **private)
        # a result, in any tab, becomes the reference of the next composed search
        for hits in ("composed_hits", "image_hits", "text_hits") if self.engine.encoder.has_text else ():
            gallery = {"composed_hits": "results", "image_hits": "image_results", "text_hits": "text_results"}[hits]
            c[gallery].select(self.refine, c[hits], pick_outputs + [c["tabs"], c["caption"]], **private)
        c["back"].click(self.step_back, c["history"], [c["reference"], c["reference_id"], c["caption"],
                                                       c["suggestions"], c["history"], c["steps"]], **private)
        c["similar"].click(self.similar, [c["reference"], c["reference_id"], c["category"], c["k"]],
                           [c["results"], c["info"], c["composed_hits"]], preprocess=False, **private)
        for trigger in (c["image_button"].click, c["image_id"].submit):
            trigger(self.image, image_inputs, image_outputs, preprocess=False, **private).then(
                None, js=scroll_to("image-results"))
        text_inputs = [c["text"], c["text_category"], c["text_k"]]
        text_outputs = [c["text_results"], c["text_info"], c["text_hits"]]
        text_push = push_query("text, category, k",
                               '{tab: "text", q: text || "", category: category || "", k: String(k)}')
        for trigger in (c["text_button"].click, c["text"].submit):
            trigger(self.text, text_inputs, text_outputs, js=text_push, **private).then(
                None, js=scroll_to("text-results"))
        restore_outputs = [c[name] for name in ("tabs", "reference", "reference_id", "suggestions", "caption",
                                                "category", "k", "mode", "results", "info", "composed_hits", "text",
                                                "text_category", "text_k", "text_results", "text_info", "text_hits",
                                                "browse_gallery", "browse_ids", "page_label")]
        c["page"].load(self.restore, None, restore_outputs, **private).then(
            None, js=scroll_to("results", "image-results", "text-results"))

    # ---- actions ------------------------------------------------------------------------------------------------
    def suggest(self, reference_id: str, caption: str):
        """A suggested caption, and its known target (marked in the results)."""
        target = next((t for c, t in self.suggested.get(reference_id, []) if c == caption), "")
        return caption, target

    def pick_from(self, ids: list[str], evt: gr.SelectData):
        return self.pick(ids[evt.index])

    def refine(self, ids: list[str], evt: gr.SelectData):
        """A clicked result becomes the reference of the next composed search, with an empty caption (in one
        update, so a caption typed right after the click is never cleared)."""
        return self.pick(ids[evt.index]) + (gr.Tabs(selected="composed"), "")

    @staticmethod
    def clicked(ids: list[str], evt: gr.SelectData) -> str:
        return ids[evt.index]

    def composed(self, image, caption, category, k, mode, reference_id, target_id, history):
        shown = self.shown(lambda: self.engine.composed_search(
            caption, None if reference_id else read_upload(image), reference_id or None, int(k),
            category_value(category), MODES.get(mode, mode)), target_id)
        step = (reference_id or "an uploaded image", caption)
        if not shown.failed and (not history or history[-1] != step):
            history = (history or []) + [step]
        return shown.gallery, shown.info, shown.hits, history, self.describe_steps(history)

    @staticmethod
    def describe_steps(history: list) -> str:
        if not history:
            return ""
        return "**Steps:** " + " → ".join(f"{plain(ref)} + “{plain(cap)}”" for ref, cap in history[-6:])

    def step_back(self, history: list):
        """Go back one step: the previous step's reference and caption (its results are one search away)."""
        if not history or len(history) < 2:
            return gr.update(), gr.update(), gr.update(), gr.update(), history, self.describe_steps(history)
        history = history[:-1]
        ref, cap = history[-1]
        image, ref_id, suggestions, _ = self.pick(ref if ref in self.index else "")
        return image, ref_id, cap, suggestions, history, self.describe_steps(history)

    def similar(self, image, reference_id, category, k):
        shown = self.shown(lambda: self.engine.image_search(None if reference_id else read_upload(image), int(k),
                                                            category_value(category), reference_id or None))
        return shown.gallery, shown.info, shown.hits

    def image(self, image, image_id, category, k):
        return self.similar(image, (image_id or "").strip(), category, k)

    def text(self, caption, category, k):
        shown = self.shown(lambda: self.engine.text_search(caption, int(k), category_value(category)))
        return shown.gallery, shown.info, shown.hits

    def restore(self, request: gr.Request) -> dict:
        """Open the page at its address: the search it holds is run again (a shared link, the browser's Back);
        the outputs it sets, by component."""
        c = self.c
        q = dict(request.query_params) if request is not None else {}
        out = dict(zip((c["browse_gallery"], c["browse_ids"], c["page_label"]), self.browse(ALL, 0, 0, "")))
        try:
            k = int(q.get("k") or 12)
        except ValueError:
            k = 12
        category = q.get("category") or ALL
        if q.get("tab") == "text" and q.get("q"):
            results = self.text(q["q"], category, k)
            out.update({c["tabs"]: gr.Tabs(selected="text"), c["text"]: q["q"], c["text_category"]: category,
                        c["text_k"]: k, **dict(zip((c["text_results"], c["text_info"], c["text_hits"]), results))})
        elif q.get("tab") == "composed" and q.get("caption") and q.get("ref") in self.index:
            picked = self.pick(q["ref"])
            mode = q.get("mode") if q.get("mode") in self.modes else self.modes[0]
            results = self.composed(None, q["caption"], category, k, mode, q["ref"], picked[3], [])
            out.update({c["tabs"]: gr.Tabs(selected="composed"), c["caption"]: q["caption"], c["category"]: category,
                        c["k"]: k, c["mode"]: mode,
                        **dict(zip((c["reference"], c["reference_id"], c["suggestions"]), picked[:3])),
                        **dict(zip((c["results"], c["info"], c["composed_hits"]), results[:3]))})
        return out


def about(engine: SearchEngine) -> str:
    """What the index is, in the words a researcher wants: model, Combiner, index kind and settings, sizes."""
    index = engine.index
    source = index.source.get("data", {})
    lines = [
        f"- **Model**: {plain(engine.encoder.describe())}",
        f"- **Combiner**: {'loaded' if engine.combiner else 'none (simple sum only)'}",
        f"- **Index**: {plain(index.kind)}, metric {index.metric}, {len(index):,} items, "
        f"{len(index.categories())} categories" + (", exact search" if not index.tuning else ""),
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
    app.launch(server_name=host, server_port=port, share=share, show_error=True, prevent_thread_lock=True,
               allowed_paths=[str(thumbnails.folder)], max_file_size=MAX_UPLOAD, quiet=quiet, css=CSS, head=HEAD,
               app_kwargs={"docs_url": "/api/docs", "openapi_url": "/api/openapi.json"})
    add_catalog_routes(app.app, engine.index, thumbnails)
    add_http_api(app.app, engine)
    return app


__all__ = ["App", "build_app", "serve", "plain", "MAX_K"]
