"""clip-retrieval's back-end API on the app's own server, so that its clients work unchanged: its Python
``ClipClient``, its web front end (``?back=THIS_SERVER``) and the demos that call a ``clip back``.

- ``POST /knn-service``: ``text``, ``image`` (base64), ``image_url``, ``embedding_input``, ``modality``,
  ``num_images``, ``num_result_ids``, ``indice_name``, ``deduplicate``; the body is read as JSON whatever its
  Content-Type says (``ClipClient`` sends none). The safety, violence, aesthetic and mclip fields are accepted and
  ignored. Answers ``[{id, similarity, url, caption, ...}]`` as ``clip back`` does, ``id`` being the catalog id.
  Our addition: a query with both ``text`` and ``image`` is a composed query (the reference changed as the text
  says; ``mode`` chooses how they combine), where ``clip back`` would silently search with the text alone.
  ``image_url`` is fetched only where the operator allows it, and only from public hosts (serving.image_urls).
- ``GET /indices-list``: this server's one index name (``CLIP4CIR_INDEX_NAME``, default ``clip4cir``).
- ``POST /metadata``: ``{"ids": [...], "indice_name": ...}`` → ``[{id, metadata: {url, caption, ...}}]``.
- ``GET /config.json``: the front end's settings (this server as its default back end).

Errors are HTTP statuses with ``{"detail": message}``: 400 a query that cannot be answered, 404 an unknown index,
item or category, 413 a body over its limit, 422 a field of the wrong type. Every answer allows any origin (CORS),
as ``clip back``'s do, since the front end is served from elsewhere.
"""
from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from clip4cir.core.errors import BusyError, Clip4CirError, DataError, SearchError, UnknownItemError
from clip4cir.data.images import decode_image
from clip4cir.retrieval.search import MAX_K, SearchEngine, SearchResult
from clip4cir.retrieval.vector_store import normalized
from clip4cir.serving.catalog_routes import image_url
from clip4cir.serving.http_api import MAX_IMAGE_BYTES, MAX_JSON_BYTES, bounded_body
from clip4cir.serving.image_urls import fetch_image_url
from clip4cir.serving.uploads import QUERY_SIDE

NAME_ENV = "CLIP4CIR_INDEX_NAME"
DEDUPLICATE_ABOVE = 0.94  # results this alike (cosine) are one, as clip back deduplicates
DEDUPLICATE_DEPTH = 1_000  # candidates a deduplicated query looks at, at most
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type"}
FIELD_TYPES = {"text": str, "image": str, "image_url": str, "embedding_input": list, "modality": str,
               "indice_name": str, "deduplicate": bool, "mode": str, "category": str}


def index_name() -> str:
    return os.environ.get(NAME_ENV, "").strip() or "clip4cir"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def parsed(body: bytes) -> dict:
    """The request's fields, JSON whatever the Content-Type; 422 naming a field of the wrong type (the ignored
    fields are not checked)."""
    try:
        fields = json.loads(body or b"{}", parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise HTTPException(400, f"the body is not JSON, or nested too deeply ({str(e)[:80]})") from None
    if not isinstance(fields, dict):
        raise HTTPException(422, "the body must be a JSON object")
    if not fields.get("image") and len(body) > MAX_JSON_BYTES:
        raise HTTPException(413, f"a request without an image may have at most {MAX_JSON_BYTES:,} bytes")
    for name, kind in FIELD_TYPES.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise HTTPException(422, f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    for name in ("num_images", "num_result_ids"):
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K):
            raise HTTPException(422, f"{name} must be a whole number from 1 to {MAX_K:,}")
    return fields


def check_index(fields: dict) -> None:
    name = fields.get("indice_name")
    if name not in (None, "", index_name()):
        raise HTTPException(404, f"no index {name[:80]!r} here; this server has {index_name()!r} (GET /indices-list)")


def query_image(fields: dict):
    """The query image: ``image`` (base64) or the one at ``image_url``; None for neither."""
    if fields.get("image"):
        if len(fields["image"]) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise HTTPException(413, f"the image is larger than the {MAX_IMAGE_BYTES // 2 ** 20} MB an upload may be")
        try:
            data = base64.b64decode(fields["image"], validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image is not base64") from None
    elif fields.get("image_url"):
        data = fetch_image_url(fields["image_url"])
    else:
        return None
    try:
        return decode_image(data, "the query image", QUERY_SIDE)
    except DataError as e:
        raise HTTPException(400, str(e)) from None


def search(engine: SearchEngine, fields: dict) -> SearchResult:
    """The query the fields describe: text and image together composed, else whichever is given."""
    if fields.get("modality", "image") != "image":
        raise SearchError("this index holds images: modality 'text' (a caption index) is not served here")
    num_images = fields.get("num_images") or 40
    k = min(max(fields.get("num_result_ids") or num_images, num_images), MAX_K, len(engine.index))
    if fields.get("deduplicate"):  # each candidate's feature is read and compared: bounded
        k = min(k, DEDUPLICATE_DEPTH)
    text, image = (fields.get("text") or "").strip(), query_image(fields)
    category = fields.get("category")
    if text and image is not None:
        return engine.composed_search(text, image, None, k, category, fields.get("mode") or default_mode(engine))
    if text:
        return engine.text_search(text, k, category or "all")
    if image is not None:
        return engine.image_search(image, k, category or "all")
    if fields.get("embedding_input") is not None:
        return engine.embedding_search(fields["embedding_input"], k, category)
    raise SearchError("give text, image, image_url or embedding_input")


def default_mode(engine: SearchEngine) -> str:
    return "combiner" if engine.combiner is not None else "sum"


def deduplicated(engine: SearchEngine, result: SearchResult) -> list:
    """The hits without those nearly identical (cosine above DEDUPLICATE_ABOVE) to a better-ranked one."""
    if not result.hits:
        return []
    vectors = normalized(np.stack([engine.index.feature(hit.id) for hit in result.hits]))
    similar = vectors @ vectors.T
    kept: list[int] = []
    for n in range(len(result.hits)):
        if not kept or similar[n, kept].max() <= DEDUPLICATE_ABOVE:
            kept.append(n)
    return [result.hits[n] for n in kept]


def answer(engine: SearchEngine, fields: dict, base: str) -> list[dict]:
    """The knn-service answer: ``num_images`` records, best first."""
    try:
        result = search(engine, fields)
        hits = deduplicated(engine, result) if fields.get("deduplicate") else result.hits
    except UnknownItemError as e:
        raise HTTPException(404, str(e)) from None
    except SearchError as e:
        raise HTTPException(400, str(e)) from None
    except BusyError as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    except Clip4CirError as e:
        raise HTTPException(502, str(e)) from None
    return [{"id": h.id, "similarity": round(h.score, 6), "url": image_url(base, h.id), "caption": h.title,
             "categories": h.categories, "match": h.match} for h in hits[:fields.get("num_images") or 40]]


def metadata(engine: SearchEngine, fields: dict, base: str) -> list[dict]:
    ids = fields.get("ids")
    if not isinstance(ids, list) or len(ids) > MAX_K or not all(isinstance(i, str) for i in ids):
        raise HTTPException(422, f"ids must be a list of at most {MAX_K:,} item ids")
    out = []
    for item_id in ids:
        if item_id in engine.index:
            item = engine.index.item(item_id)
            out.append({"id": item_id, "metadata": {"url": image_url(base, item_id),
                                                    "caption": engine.index.titles.get(item_id, ""),
                                                    "categories": list(item.categories)}})
        else:
            out.append({"id": item_id, "metadata": None})
    return out


def add_clip_retrieval_api(app: FastAPI, engine: SearchEngine) -> None:
    """Serve clip-retrieval's back-end routes on ``app`` (the Gradio app's FastAPI server)."""

    def allowed(content, status: int = 200) -> Response:
        return JSONResponse(content, status, headers=CORS)

    async def call(request: Request, work) -> Response:
        try:
            fields = parsed(await bounded_body(request))
            check_index(fields)
            return allowed(await run_in_threadpool(work, engine, fields, str(request.base_url)))
        except HTTPException as e:
            return JSONResponse({"detail": e.detail}, e.status_code, headers={**CORS, **(e.headers or {})})

    @app.post("/knn-service", include_in_schema=False)
    async def knn_service(request: Request) -> Response:
        return await call(request, answer)

    @app.post("/metadata", include_in_schema=False)
    async def metadata_service(request: Request) -> Response:
        return await call(request, metadata)

    @app.get("/indices-list", include_in_schema=False)
    def indices_list() -> Response:
        return allowed([index_name()])

    @app.get("/config.json", include_in_schema=False)
    def front_config(request: Request) -> Response:
        return allowed({"defaultBackend": str(request.base_url).rstrip("/"), "defaultIndex": index_name()})

    for path in ("/knn-service", "/metadata", "/indices-list"):
        app.add_api_route(path, lambda: Response(status_code=204, headers=CORS), methods=["OPTIONS"],
                          include_in_schema=False)
