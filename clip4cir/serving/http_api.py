"""A plain JSON API beside the Gradio one, for programmatic clients: ``POST /api/search`` on the app's own server
(no queue, no event stream), documented at ``/api/docs`` (OpenAPI: ``/api/openapi.json``). The same three searches
and parameters as the named Gradio API, the same records, and errors as HTTP status codes with a message: 400 a
query that cannot be answered, 404 an unknown item or category, 413 an image over the upload limit, 422 a request
that does not fit the schema, 502 the vector database refused the request, 503 the server is busy (or its vector
database does not answer)."""
from __future__ import annotations

import base64
import binascii
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from clip4cir.core.errors import BusyError, Clip4CirError, DataError, SearchError, UnknownItemError
from clip4cir.data.images import decode_image
from clip4cir.retrieval.search import MAX_K, SearchEngine
from clip4cir.serving.api import records

MAX_IMAGE_BYTES = 20 * 2 ** 20  # as the page's uploads


class SearchRequest(BaseModel):
    """One query: ``composed`` (a caption and a reference: ``reference_id`` or ``image_base64``), ``image`` (a
    reference alone) or ``text`` (a caption alone)."""

    kind: Literal["composed", "image", "text"]
    caption: str | None = Field(None, description="how the wanted item differs (composed), or what it is (text)")
    reference_id: str | None = Field(None, description="a catalog item as the reference (its stored feature)")
    image_base64: str | None = Field(None, description="the query image's file (JPEG, PNG, ...), base64-encoded")
    category: str = Field("all", description="a category of the catalog, all, reference (the reference's own) or "
                                              "auto (predicted from the query)")
    k: int = Field(10, ge=1, le=MAX_K, description="how many results")
    mode: Literal["combiner", "sum", "phi"] = Field("combiner", description="composed: how image and words combine "
                                                    "(phi: zero-shot, when the app has a φ)")


class Hit(BaseModel):
    rank: int
    id: str
    categories: list[str]
    score: float
    thumbnail_url: str
    image_url: str


class SearchResponse(BaseModel):
    results: list[Hit]
    category: str | None
    notes: list[str]
    milliseconds: float


def decoded_image(text: str | None):
    """The image a request carries, or None; 413 when too large, 400 when not an image."""
    if not text:
        return None
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise HTTPException(413, f"the image is larger than the {MAX_IMAGE_BYTES // 2 ** 20} MB an upload may be")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image_base64 is not base64") from None
    try:
        return decode_image(data, "the uploaded image")
    except DataError as e:
        raise HTTPException(400, str(e)) from None


def add_http_api(app: FastAPI, engine: SearchEngine) -> None:
    """Serve ``POST /api/search`` on ``app`` (the Gradio app's FastAPI server)."""

    @app.post("/api/search", response_model=SearchResponse, tags=["search"],
              responses={400: {"description": "a query that cannot be answered"},
                         404: {"description": "an unknown item or category"},
                         413: {"description": "an image over the upload limit"},
                         502: {"description": "the vector database refused the request"},
                         503: {"description": "the server is busy, or its vector database does not answer: try "
                                              "again"}})
    def search(query: SearchRequest, request: Request) -> dict:
        """Composed, image or text search over the catalog; returns the ranked items with their links."""
        image = decoded_image(query.image_base64)
        try:
            if query.kind == "composed":
                result = engine.composed_search(query.caption, image, query.reference_id, query.k, query.category,
                                                query.mode)
            elif query.kind == "image":
                result = engine.image_search(image, query.k, query.category, query.reference_id)
            else:
                result = engine.text_search(query.caption, query.k, query.category)
        except UnknownItemError as e:
            raise HTTPException(404, str(e)) from None
        except SearchError as e:
            raise HTTPException(400, str(e)) from None
        except BusyError as e:  # the batch queue is full, or the vector database does not answer
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        except Clip4CirError as e:  # the store refused the request (e.g. its credentials)
            raise HTTPException(502, str(e)) from None
        return records(result, str(request.base_url))
