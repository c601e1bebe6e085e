"""The Gradio UI: composed, image and text search tabs over one search engine, each action a stable API endpoint."""
from __future__ import annotations

import html
import logging
import os
import re
from typing import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from .errors import DataError, SearchError  # noqa: E402
from .images import load_image  # noqa: E402
from .search import SearchEngine, SearchResult  # noqa: E402
from .service import examples, image_folders  # noqa: E402
from .threads import configure_serving_threads  # noqa: E402

MAX_RESULTS = 50
STRIP_SIZE = 24
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads; load_image refuses more than 50 megapixels
log = logging.getLogger("clip4cir.ui")


def plain(text: str) -> str:
    """Text from a user or a file name made inert in Markdown: HTML escaped and the marks that format inline text
    backslashed, so ``<img src=x>``, ``# big`` or ``*bold*`` show as typed (it never starts a line here)."""
    return re.sub(r"([\\`*_\[\]#!|~])", r"\\\1", html.escape(text, quote=False))


def gallery(result: SearchResult, target_id: str = "") -> list[tuple[str, str]]:
    """Result images captioned with id, categories and score; the known target is marked."""
    return [(h.path, ("★ TARGET · " if h.id == target_id else "") +
             f"{h.id} · {', '.join(h.categories) or '-'} · {h.score:.3f}") for h in result.hits]


def message(result: SearchResult) -> str:
    parts = [f"{len(result.hits)} results in {1000 * result.seconds:.0f} ms"]
    if result.category:
        parts.append(f"within {plain(result.category)}")
    return " · ".join(parts + [plain(note) for note in result.notes])


def status_line(engine: SearchEngine) -> str:
    index = engine.index
    return (f"**Model** {plain(engine.encoder.describe())} · **Combiner** {'loaded' if engine.combiner else 'none'} · "
            f"**Index** {index.kind}/{index.metric}, {len(index):,} items, "
            f"{len(index.categories())} categories")


def read_upload(value) -> Image.Image | None:
    """The image of an image input, passed unprocessed (the events read uploads themselves, so a file that is not
    an image, or is too large, gets a message naming the uploaded file instead of Gradio's preprocessing error)."""
    if not value:
        return None
    path = value.get("path") if isinstance(value, dict) else str(value)
    name = (value.get("orig_name") if isinstance(value, dict) else None) or os.path.basename(path)
    try:
        return load_image(path)
    except DataError as e:
        raise SearchError(str(e).replace(str(path), name)) from None


def guarded(search):
    """Run a search; a bad query becomes a warning and an error line in the UI, never a stack trace."""
    def run(*args):
        try:
            return search(*args)
        except SearchError as e:
            gr.Warning(html.escape(str(e)))
            return [], f"⚠️ {plain(str(e))}", []
        except Exception as e:  # the app stays up whatever happens
            log.exception("search failed")
            gr.Warning(html.escape(f"search failed: {e}"))
            return [], f"⚠️ search failed: {plain(str(e))}", []
    run.__name__ = search.__name__
    run.__doc__ = search.__doc__
    return run


def build_app(engine: SearchEngine, demo_examples: Sequence[dict] = ()) -> gr.Blocks:
    """The UI: three tabs over one search engine, each action with a stable api_name."""
    categories = engine.index.categories()
    modes = ["Combiner", "Sum"] if engine.combiner is not None else ["Sum"]
    strip_ids = list(dict.fromkeys([e["reference_id"] for e in demo_examples] +
                                   engine.index.ids(STRIP_SIZE)))[:STRIP_SIZE]

    def composed_search(image, caption, category, k, mode, reference_id, target_id):
        """Composed search: the reference (uploaded image, or a catalog id) changed as the caption says."""
        result = engine.composed_search(caption, image=None if reference_id else read_upload(image),
                                        reference_id=reference_id or None, k=int(k),
                                        category=category, mode=mode.lower())
        return gallery(result, target_id), message(result), [h.id for h in result.hits]

    def image_search(image, category, k):
        """Image search: catalog items that look like the image."""
        result = engine.image_search(read_upload(image), k=int(k), category=category)
        return gallery(result), message(result), [h.id for h in result.hits]

    def text_search(caption, category, k):
        """Text search: catalog items the description fits."""
        result = engine.text_search(caption, k=int(k), category=category)
        return gallery(result), message(result), [h.id for h in result.hits]

    def use_as_reference(ids: list[str], evt: gr.SelectData):
        item = engine.index.item(ids[evt.index])
        return item.path, item.id, ""

    with gr.Blocks(title="Composed image retrieval (CLIP4Cir)") as app:
        gr.Markdown("# Composed image retrieval\nShow a reference item and say how the wanted item differs.")
        gr.Markdown(status_line(engine), elem_id="status")
        with gr.Tab("Composed search"):
            with gr.Row():
                with gr.Column(scale=1):
                    reference = gr.Image(label="Reference", type="filepath", sources=["upload", "webcam", "clipboard"],
                                         height=280, elem_id="reference")
                    reference_id = gr.Textbox(label="Reference id (catalog item)", elem_id="reference-id")
                    target_id = gr.Textbox(visible=False, label="Known target")
                with gr.Column(scale=2):
                    caption = gr.Textbox(label="How should it differ?", placeholder="is red with shorter sleeves",
                                         elem_id="caption")
                    with gr.Row():
                        category = gr.Dropdown(["all", "auto"] + categories, value="auto" if categories else "all",
                                               label="Category")
                        k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="Results")
                        mode = gr.Radio(modes, value=modes[0], label="Combining")
                    search = gr.Button("Search", variant="primary", elem_id="composed-search")
                    info = gr.Markdown(elem_id="composed-info")
            strip = gr.Gallery([(engine.index.item(i).path, i) for i in strip_ids], label="Pick a reference from the "
                               "catalog", columns=12, height=150, allow_preview=False, elem_id="catalog-strip")
            results = gr.Gallery(label="Results (click one to refine from it)", columns=5, height=420,
                                 allow_preview=False, elem_id="composed-results")
            hits = gr.State([])
            if demo_examples:
                gr.Examples([[e["reference_path"], e["caption"], e["reference_id"], e["target_id"]]
                             for e in demo_examples], [reference, caption, reference_id, target_id],
                            label="Validation queries (the known target is marked ★)")
            search.click(guarded(composed_search), [reference, caption, category, k, mode, reference_id, target_id],
                         [results, info, hits], api_name="composed_search", preprocess=False)
            caption.submit(guarded(composed_search), [reference, caption, category, k, mode, reference_id, target_id],
                           [results, info, hits], api_name=False, preprocess=False)
            reference.input(lambda: ("", ""), None, [reference_id, target_id], api_name=False)
            strip.select(use_as_reference, gr.State(strip_ids), [reference, reference_id, target_id], api_name=False)
            results.select(use_as_reference, hits, [reference, reference_id, target_id], api_name=False)
        with gr.Tab("Image search"):
            with gr.Row():
                query_image = gr.Image(label="Query image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                       height=280)
                with gr.Column():
                    image_category = gr.Dropdown(["all", "auto"] + categories, value="all", label="Category")
                    image_k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="Results")
                    image_button = gr.Button("Search", variant="primary")
                    image_info = gr.Markdown()
            image_results = gr.Gallery(label="Results", columns=5, height=420, allow_preview=False)
            image_button.click(guarded(image_search), [query_image, image_category, image_k],
                               [image_results, image_info, gr.State([])], api_name="image_search", preprocess=False)
        with gr.Tab("Text search"):
            with gr.Row():
                text = gr.Textbox(label="Description", placeholder="a red striped dress with long sleeves")
                with gr.Column():
                    text_category = gr.Dropdown(["all"] + categories, value="all", label="Category")
                    text_k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="Results")
                    text_button = gr.Button("Search", variant="primary")
                    text_info = gr.Markdown()
            text_results = gr.Gallery(label="Results", columns=5, height=420, allow_preview=False)
            text_button.click(guarded(text_search), [text, text_category, text_k],
                              [text_results, text_info, gr.State([])], api_name="text_search")
    return app


def serve(engine: SearchEngine, host: str | None = None, port: int | None = None, share: bool = False,
          quiet: bool = False) -> gr.Blocks:
    """Build the app for ``engine`` and start serving it (without blocking). Gradio serves files only from the
    working and temp folders and ``allowed_paths``: exactly the catalog's image folders are allowed, so a catalog
    anywhere (a home cache, a Space's data, ``--data /srv/...``) is served and nothing else is."""
    app = build_app(engine, examples(engine.index))
    app.queue(default_concurrency_limit=4)
    configure_serving_threads()
    app.launch(server_name=host, server_port=port, share=share, show_error=True, prevent_thread_lock=True,
               allowed_paths=image_folders(engine.index), max_file_size=MAX_UPLOAD, quiet=quiet)
    return app
