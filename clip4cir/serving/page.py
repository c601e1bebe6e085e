"""The page's layout: its components, built in parts (the composed tab, the catalog browser, the image and text
tabs) and held in dataclasses, so the events (clip4cir.serving.ui) name each by attribute and a renamed one is an
error at once; the choices the controls offer; the page's style and browser code (static/app.css, app.js).

Layout: the query on the left and the results on the right (the catalog browser with the query) on a wide screen,
one column on a phone; result grids grow with the page (no boxes that scroll inside it).
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from clip4cir.retrieval.search import DEFAULT_CATEGORY, MAX_K, SearchEngine

MAX_RESULTS = 50  # the slider's end; "More results" goes on to MAX_K
MODES = [("Fused (Combiner)", "combiner"), ("Simple sum", "sum"), ("Zero-shot (no triplets)", "phi")]
ALL = ("All categories", "all")
REFERENCE = ("The reference's, or the one the change names", "reference")
GUESS = ("Guess from the query", "auto")
SCORE_HELP = ("Each result says how well it fits: a strong, good or weak match, against the scores the catalog's "
              "known right answers get. When even the first fits poorly, a notice says so.")
TARGET_HELP = " ★ marks the item the catalog's annotators meant for that change."

STATIC = Path(__file__).parent / "static"
# in the head as they are: Gradio would scope a css= argument to its main column, where its warnings (and the
# body's dark-mode class) are not
HEAD = (f"<script>{(STATIC / 'app.js').read_text(encoding='utf-8')}</script>"
        f"<style>{(STATIC / 'app.css').read_text(encoding='utf-8')}</style>")
FOCUS_CAPTION = "() => clip4cirPage.focusCaption()"
LOAD_STEPS = "(steps) => [clip4cirPage.loadSteps()]"
SAVE_STEPS = "(steps) => clip4cirPage.saveSteps(steps)"


def plain(text: str) -> str:
    """Text from a user or a file name made inert in Markdown: HTML escaped and the marks that format inline text
    backslashed, so ``<img src=x>``, ``# big`` or ``*bold*`` show as typed (it never starts a line here)."""
    return re.sub(r"([\\`*_\[\]#!|~])", r"\\\1", html.escape(text, quote=False))


def scroll_to(*elem_ids: str) -> str:
    """Browser code that brings the first shown results gallery among ``elem_ids`` into view (static/app.js)."""
    return f"() => clip4cirPage.scrollTo({json.dumps(list(elem_ids))})"


def address(tab: str, names: list[str], push: bool = True, steps: bool = False) -> str:
    """Browser code run after a search: its inputs, named ``names``, into the page address (a new history entry
    with ``push``); with ``steps``, its last input, the steps, into session storage (static/app.js)."""
    return (f"(...values) => clip4cirPage.address({json.dumps(tab)}, {json.dumps(names)}, values, "
            f"{json.dumps(push)}, {json.dumps(steps)})")


@dataclass(frozen=True)
class Choices:
    """What the controls offer for one engine: the ways to combine (those it can run), the categories of each
    tab, the defaults (the engine's and the JSON API's) and whether it reads words at all."""

    words: bool
    modes: list[tuple[str, str]]
    categories: list[str]
    reference_categories: list[tuple[str, str]]
    text_categories: list[tuple[str, str]]
    defaults: dict[str, str]
    mode_info: str

    @classmethod
    def of(cls, engine: SearchEngine) -> Choices:
        modes = [(label, value) for label, value in MODES if (value != "combiner" or engine.combiner is not None)
                 and (value != "phi" or engine.phi is not None)]
        categories = engine.index.categories()
        named = [(c, c) for c in categories]
        guess = [GUESS] if engine.index.probe is not None else []
        reference = [REFERENCE, ALL] + guess + named if named else [ALL]
        text = [ALL] + guess + named
        values = {value for _, value in reference + text}
        info = ("Fused: a trained network merges them (best); simple sum: their features added"
                + ("; zero-shot: the picture as a word in the sentence"
                   + (", plus the simple sum" if engine.phi.sum_weight else "") if engine.phi is not None else ""))
        return cls(engine.encoder.has_text, modes, categories, reference, text,
                   {kind: value if value in values else ALL[1] for kind, value in DEFAULT_CATEGORY.items()}, info)

    @property
    def mode_names(self) -> dict[str, str]:
        return {value: label for label, value in self.modes}

    @property
    def reference_values(self) -> set[str]:
        return {value for _, value in self.reference_categories}

    @property
    def text_values(self) -> set[str]:
        return {value for _, value in self.text_categories}


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


def photo_input(label: str, elem_id: str, height: int) -> gr.Image:
    return gr.Image(label=label, type="filepath", sources=["upload", "webcam", "clipboard"], height=height,
                    elem_id=elem_id)


@dataclass
class Browser:
    """The catalog browser: pick a reference by category page, shuffle or a search by name or id."""

    category: gr.Dropdown
    lookup: gr.Textbox
    shuffle: gr.Button
    previous: gr.Button
    next: gr.Button
    label: gr.Markdown
    gallery: gr.Gallery
    page: gr.State
    seed: gr.State
    ids: gr.State

    @property
    def outputs(self) -> list:
        return [self.gallery, self.ids, self.label]

    @property
    def inputs(self) -> list:
        return [self.category, self.page, self.seed, self.lookup]

    @classmethod
    def build(cls, categories: list[str]) -> Browser:
        with gr.Accordion("Pick a reference from the catalog", open=True, elem_id="browser"):
            with gr.Row():
                category = gr.Dropdown([ALL] + [(c, c) for c in categories], value=ALL[1], label="Browse category",
                                       elem_id="browse-category")
                lookup = gr.Textbox(label="Find by name or id", elem_id="lookup", placeholder="e.g. red dress",
                                    info="Press Enter to find")
            with gr.Row():
                shuffle = gr.Button("Shuffle", size="sm", elem_id="shuffle")
                previous = gr.Button("Previous page", size="sm", elem_id="previous")
                following = gr.Button("Next page", size="sm", elem_id="next")
            label = gr.Markdown(elem_id="page-label")
            gallery = gr.Gallery(label="Catalog items (click one to use it as the reference)", columns=4,
                                 height="auto", allow_preview=False, object_fit="contain", buttons=[],
                                 elem_id="browse")
        return cls(category, lookup, shuffle, previous, following, label, gallery, gr.State(0), gr.State(0),
                   gr.State([]))


@dataclass
class ComposedTab:
    """The composed search: the reference (picked, typed or uploaded), the change, the steps trail, the options,
    the catalog browser, and the results with the ways-compared table."""

    reference: gr.Image
    reference_id: gr.Textbox
    suggestions: gr.Radio
    caption: gr.Textbox
    search: gr.Button
    back: gr.Button
    similar: gr.Button
    compare: gr.Button
    trail: gr.Radio
    category: gr.Dropdown
    k: gr.Slider
    mode: gr.Radio
    target_id: gr.Textbox
    browser: Browser
    panel: Panel
    comparison: gr.Markdown

    @classmethod
    def build(cls, choices: Choices) -> ComposedTab:
        with gr.Row(elem_id="composed-layout", equal_height=False):
            with gr.Column(scale=2, min_width=300, elem_id="query-column"):
                reference = photo_input("Reference item", "reference", 220)
                reference_id = gr.Textbox(label="Catalog id of the reference", elem_id="reference-id",
                                          info="Type an id and press Enter, pick an item from the catalog below, "
                                               "or upload a photo")
                suggestions = gr.Radio([], label="Changes written for this item (click one)", visible=False,
                                       elem_id="suggestions")
                caption = gr.Textbox(label="How should it differ?", elem_id="caption",
                                     placeholder="is red with shorter sleeves", info="Press Enter to search")
                search = gr.Button("Search", variant="primary", elem_id="composed-search")
                with gr.Row():
                    back = gr.Button("Back to the previous step", size="sm", interactive=False, elem_id="back")
                    similar = gr.Button("More like the reference", size="sm", elem_id="similar")
                    compare = gr.Button("Compare the ways to combine", size="sm", elem_id="compare",
                                        visible=len(choices.modes) > 1)
                trail = gr.Radio([], label="Steps (click one to go back to it)", visible=False, interactive=True,
                                 elem_id="steps-trail")
                category, k = search_options("composed", choices.reference_categories, choices.defaults["composed"])
                mode = gr.Radio(choices.modes, value=choices.modes[0][1], label="How to combine picture and words",
                                elem_id="mode", info=choices.mode_info)
                target_id = gr.Textbox(visible=False, label="Known target")
                browser = Browser.build(choices.categories)
            with gr.Column(scale=3, min_width=300, elem_id="composed-results-column"):
                panel = results_panel("composed", SCORE_HELP + TARGET_HELP)
                comparison = gr.Markdown(elem_id="comparison")
        return cls(reference, reference_id, suggestions, caption, search, back, similar, compare, trail, category,
                   k, mode, target_id, browser, panel, comparison)


@dataclass
class ImageTab:
    """Find similar: a photo or a catalog id, the options and the results."""

    photo: gr.Image
    item_id: gr.Textbox
    search: gr.Button
    category: gr.Dropdown
    k: gr.Slider
    panel: Panel

    @property
    def inputs(self) -> list:
        return [self.photo, self.item_id, self.category, self.k]

    @classmethod
    def build(cls, choices: Choices) -> ImageTab:
        with gr.Row(elem_id="image-layout", equal_height=False):
            with gr.Column(scale=2, min_width=300):
                photo = photo_input("Query photo", "query-image", 240)
                item_id = gr.Textbox(label="Or a catalog id", elem_id="image-id",
                                     info="Press Enter to find items like it (a photo is then cleared: one query "
                                          "at a time)")
                search = gr.Button("Search", variant="primary", elem_id="image-search")
                category, k = search_options("image", choices.reference_categories, choices.defaults["image"])
            with gr.Column(scale=3, min_width=300):
                panel = results_panel("image")
        return cls(photo, item_id, search, category, k, panel)


@dataclass
class TextTab:
    """Describe it: a description, the options and the results."""

    query: gr.Textbox
    search: gr.Button
    category: gr.Dropdown
    k: gr.Slider
    panel: Panel

    @property
    def inputs(self) -> list:
        return [self.query, self.category, self.k]

    @classmethod
    def build(cls, choices: Choices) -> TextTab:
        with gr.Row(elem_id="text-layout", equal_height=False):
            with gr.Column(scale=2, min_width=300):
                query = gr.Textbox(label="Description", placeholder="a red striped dress with long sleeves",
                                   info="Press Enter to search", elem_id="text")
                search = gr.Button("Search", variant="primary", elem_id="text-search")
                category, k = search_options("text", choices.text_categories, choices.defaults["text"])
            with gr.Column(scale=3, min_width=300):
                panel = results_panel("text")
        return cls(query, search, category, k, panel)


@dataclass
class Page:
    """The whole page: its tabs and the steps of a refinement (kept in the tab's session storage)."""

    tabs: gr.Tabs
    steps: gr.JSON
    composed: ComposedTab
    image: ImageTab
    text: TextTab

    @classmethod
    def build(cls, choices: Choices, about: str) -> Page:
        """Lay the page out, inside the app's ``gr.Blocks`` (the events are added there too, by the app)."""
        words = choices.words
        gr.Markdown("# Composed image retrieval\nPick or upload a reference item, say how the item you want "
                    "differs, and search the catalog." if words else
                    "# Image search\nUpload a photo or give a catalog id, and find the items most like it.",
                    elem_id="header")
        steps = gr.JSON([], visible=False, label="Steps")
        with gr.Tabs(elem_id="tabs", selected="composed" if words else "image") as tabs:
            with gr.Tab("Change an item", id="composed", elem_id="tab-composed", visible=words):
                composed = ComposedTab.build(choices)
            with gr.Tab("Find similar", id="image", elem_id="tab-image"):
                image = ImageTab.build(choices)
            with gr.Tab("Describe it", id="text", elem_id="tab-text", visible=words):
                text = TextTab.build(choices)
        with gr.Accordion("About this index", open=False, elem_id="about"):
            gr.Markdown(about)
        return cls(tabs, steps, composed, image, text)
