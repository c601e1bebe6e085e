"""The app's named API for programmatic clients (``gradio_client``): ``/composed_search``, ``/image_search`` and
``/text_search`` with named parameters, returning records (rank, id, categories, score, thumbnail and image URLs;
nothing is downloaded unless the client fetches it). A bad query is an error, never an empty success."""
from __future__ import annotations

import gradio as gr
from gradio.data_classes import FileData

from clip4cir.core.errors import Clip4CirError
from clip4cir.retrieval.search import SearchEngine, SearchResult
from clip4cir.serving.catalog_routes import image_url, thumbnail_url
from clip4cir.serving.uploads import read_upload


def base_url(request: gr.Request | None) -> str:
    """Where the app is, as the request says (absolute links for API clients); "/" when unknown."""
    return str(request.request.base_url) if request is not None and getattr(request, "request", None) else "/"


def records(result: SearchResult, base: str) -> dict:
    """Structured results: the hits with links to their thumbnails and images."""
    hits = [{"rank": rank, "id": h.id, "title": h.title, "categories": h.categories, "score": round(h.score, 6),
             "match": h.match, "thumbnail_url": thumbnail_url(base, h.id), "image_url": image_url(base, h.id)}
            for rank, h in enumerate(result.hits, 1)]
    return {"results": hits, "category": result.category, "fits": result.fits, "notes": result.notes,
            "milliseconds": round(1000 * result.seconds, 2)}


def add_named_api(engine: SearchEngine) -> None:
    """Register the three endpoints in the Blocks being built (call inside ``with gr.Blocks()``)."""

    def answer(search, request: gr.Request | None) -> dict:
        try:
            return records(search(), base_url(request))
        except Clip4CirError as e:  # a bad query, a busy server, a vector database that does not answer
            raise gr.Error(str(e), print_exception=False) from None  # a bad query is not a server fault

    def composed_search(caption: str, image: FileData | None = None, reference_id: str | None = None,
                        category: str | None = None, k: int = 10, mode: str = "combiner",
                        request: gr.Request = None) -> dict:
        """Items like the reference (an uploaded image, or a catalog item by id) changed as the caption says.
        category: a category of the catalog, "all", "reference" (the default: the category the caption names,
        else the reference's own) or "auto" (predicted from the query); mode: "combiner", "sum" or "phi"
        (zero-shot, when the app has a φ)."""
        return answer(lambda: engine.composed_search(caption, read_upload(image), reference_id or None, k, category,
                                                     mode), request)

    def image_search(image: FileData | None = None, reference_id: str | None = None, category: str | None = None,
                     k: int = 10, request: gr.Request = None) -> dict:
        """Items that look like the image, or like a catalog item ("more like this", the item left out); within
        the reference's category unless category says otherwise ("all", a category, "auto")."""
        return answer(lambda: engine.image_search(read_upload(image), k, category, reference_id or None), request)

    def text_search(caption: str, category: str = "all", k: int = 10, request: gr.Request = None) -> dict:
        """Items the description fits."""
        return answer(lambda: engine.text_search(caption, k, category), request)

    for fn in (composed_search, image_search, text_search):
        gr.api(fn, api_name=fn.__name__, queue=False)
