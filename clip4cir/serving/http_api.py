"""A plain JSON API beside the Gradio one, for programmatic clients: ``POST /api/search`` on the app's own server
(no queue, no event stream), documented at ``/api/docs`` (OpenAPI: ``/api/openapi.json``). The same three searches
and parameters as the named Gradio API, the same records, and errors as HTTP status codes with a message: 400 a
query that cannot be answered, 404 an unknown item or category, 413 an image over the upload limit, 422 a request
that does not fit the schema (strictly typed: no coercion, no unknown field, no NaN), 502 the vector database
refused the request, 503 the server is busy (or its vector database does not answer). A body is read only up to
its limit (64 KB without an image, the upload limit with one)."""
from __future__ import annotations

import base64
import binascii
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clip4cir.core.errors import BusyError, Clip4CirError, DataError, SearchError, UnknownItemError
from clip4cir.data.images import decode_image
from clip4cir.retrieval.search import MAX_K, SearchEngine
from clip4cir.serving.api import records
from clip4cir.serving.api_docs import add_api_docs
from clip4cir.serving.uploads import QUERY_SIDE

MAX_IMAGE_BYTES = 20 * 2 ** 20  # as the page's uploads
MAX_JSON_BYTES = 64 * 2 ** 10  # a request without an image
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 4 + MAX_JSON_BYTES  # with one, base64-encoded


class SearchRequest(BaseModel):
    """One query: ``composed`` (a caption and a reference: ``reference_id`` or ``image_base64``), ``image`` (a
    reference alone) or ``text`` (a caption alone)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["composed", "image", "text"]
    caption: str | None = Field(None, description="how the wanted item differs (composed), or what it is (text)")
    reference_id: str | None = Field(None, description="a catalog item as the reference (its stored feature)")
    image_base64: str | None = Field(None, description="the query image's file (JPEG, PNG, ...), base64-encoded")
    category: str | None = Field(None, description="a category of the catalog, all, reference (the category the "
                                 "caption names, else the reference's own: the default for composed and image "
                                 "queries; text queries search all) or auto (predicted from the query)")
    k: int = Field(10, ge=1, le=MAX_K, description="how many results")
    mode: Literal["combiner", "sum", "phi"] = Field("combiner", description="composed: how image and words combine "
                                                    "(phi: zero-shot, when the app has a φ)")


class Hit(BaseModel):
    rank: int
    id: str
    title: str = Field(description="the item's title (empty when the catalog has none)")
    categories: list[str]
    score: float = Field(description="cosine similarity of the query and the item")
    match: str = Field(description="strong, good or weak match: the score against those of known right answers")
    thumbnail_url: str
    image_url: str


class SearchResponse(BaseModel):
    results: list[Hit]
    category: str | None
    fits: bool | None = Field(description="false: nothing in the catalog fits the query well")
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
        return decode_image(data, "the uploaded image", QUERY_SIDE)
    except DataError as e:
        raise HTTPException(400, str(e)) from None


async def bounded_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, read no further than ``limit`` bytes (413 past it, whatever Content-Length says)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request has {int(declared):,} bytes; at most {limit:,} are read "
                                 f"(an image of {MAX_IMAGE_BYTES // 2 ** 20} MB, base64-encoded)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request has more than the {limit:,} bytes that are read "
                                     f"(an image of {MAX_IMAGE_BYTES // 2 ** 20} MB, base64-encoded)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes) -> SearchRequest:
    """The query a body holds, strictly (422 naming each wrong field, never echoing its value); 413 when a body
    without an image is over MAX_JSON_BYTES."""
    try:
        query = SearchRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise HTTPException(422, problems) from None
    if not query.image_base64 and len(body) > MAX_JSON_BYTES:
        raise HTTPException(413, f"a request without an image may have at most {MAX_JSON_BYTES:,} bytes")
    return query


REQUEST_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": SearchRequest.model_json_schema()}}}}


def add_http_api(app: FastAPI, engine: SearchEngine) -> None:
    """Serve ``POST /api/search`` on ``app`` (the Gradio app's FastAPI server), and its documentation."""

    @app.post("/api/search", response_model=SearchResponse, tags=["search"],
              responses={400: {"description": "a query that cannot be answered"},
                         404: {"description": "an unknown item or category"},
                         413: {"description": "an image over the upload limit"},
                         502: {"description": "the vector database refused the request"},
                         422: {"description": "a request that does not fit the schema"},
                         503: {"description": "the server is busy, or its vector database does not answer: try "
                                              "again"}},
              openapi_extra=REQUEST_SCHEMA)
    async def search(request: Request) -> dict:
        """Composed, image or text search over the catalog; returns the ranked items with their links."""
        query = parse_request(await bounded_body(request))
        return await run_in_threadpool(answer, query, str(request.base_url))

    def answer(query: SearchRequest, base: str) -> dict:
        try:
            image = decoded_image(query.image_base64)
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
        return records(result, base)

    add_api_docs(app, __doc__)
