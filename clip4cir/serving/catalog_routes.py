"""The app's file routes for the catalog: ``/catalog/image/ID`` (the item's image) and ``/catalog/thumbnail/ID``
(its thumbnail), looked up by id in the index, never by path. Only image files are served (by extension: JPEG,
PNG, WebP, GIF, BMP, TIFF; SVG and everything else is 403), with the Content-Type of their extension and
``X-Content-Type-Options: nosniff``, so nothing in a catalog folder can run script on the app's origin."""
from __future__ import annotations

import os
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Response
from starlette.convertors import PathConvertor, register_url_convertor

from clip4cir.core.errors import BusyError, Clip4CirError, DataError
from clip4cir.data.images import read_file
from clip4cir.retrieval.index_protocol import Index
from clip4cir.serving.thumbnails import Thumbnails

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
PREFIX = "/catalog"
HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Disposition": "inline", "Cache-Control": "max-age=3600"}


class ItemIdConvertor(PathConvertor):
    """An item id in a URL: any characters, newlines included (Starlette's ``path`` stops at a newline, so the
    link of a file named with one would answer 404)."""

    regex = r"[\s\S]*"


register_url_convertor("item_id", ItemIdConvertor())


def image_url(base: str, item_id: str) -> str:
    return f"{base.rstrip('/')}{PREFIX}/image/{quote(item_id, safe='')}"


def thumbnail_url(base: str, item_id: str) -> str:
    return f"{base.rstrip('/')}{PREFIX}/thumbnail/{quote(item_id, safe='')}"


def _served(path: str) -> Response:
    media_type = IMAGE_TYPES.get(os.path.splitext(path)[1].lower())
    if media_type is None:
        raise HTTPException(403, "only image files are served")
    try:
        body = read_file(path)
    except DataError:
        raise HTTPException(404, "the image cannot be read") from None
    return Response(body, media_type=media_type, headers=HEADERS)


def add_catalog_routes(app: FastAPI, index: Index, thumbnails: Thumbnails) -> None:
    """Serve the index's item images and thumbnails on ``app`` (the Gradio app's FastAPI server)."""

    def item_path(item_id: str) -> str:
        try:
            if item_id not in index:
                raise HTTPException(404, "no such item")
            return index.item(item_id).path
        except BusyError as e:  # a vector database that does not answer
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        except Clip4CirError as e:
            raise HTTPException(502, str(e)) from None

    @app.get(PREFIX + "/image/{item_id:item_id}", include_in_schema=False)
    def catalog_image(item_id: str) -> Response:
        path = item_path(item_id)
        return _served(path if os.path.isfile(path) else thumbnails.large(item_id))  # a data set row: a copy

    @app.get(PREFIX + "/thumbnail/{item_id:item_id}", include_in_schema=False)
    def catalog_thumbnail(item_id: str) -> Response:
        item_path(item_id)
        try:
            return _served(thumbnails.small(item_id))
        except DataError:
            raise HTTPException(404, "the image cannot be read") from None
