"""Images the app's clients send: only files Gradio received from them (its FileData, in its upload folder), read
safely (clip4cir.data.images), with errors that name the uploaded file, never a server path."""
from __future__ import annotations

import os

from gradio.data_classes import FileData
from gradio.utils import get_upload_folder
from PIL import Image

from clip4cir.core.errors import DataError, SearchError
from clip4cir.data.images import load_image

QUERY_SIDE = 1024  # an uploaded query image is decoded at most this large (the encoders read 224-448 pixels)
NOT_AN_UPLOAD = ("the image must be a file uploaded to this app (gradio_client: image=handle_file(PATH); the page: "
                 "drop or paste it), or give reference_id for a catalog item")


def uploaded_path(value) -> str | None:
    """The server path of a file the client uploaded to Gradio (its FileData, whose path Gradio checked is in
    its upload folder), or None for no image. Anything else (a path string, a dict without Gradio's file
    metadata, a path outside the upload folder) is refused with the same message whether or not such a
    file exists, so the API never reads, or tells about, a file the client did not send."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, FileData):
        value = value.model_dump()
    if not isinstance(value, dict) or not isinstance(value.get("path"), str) \
            or (value.get("meta") or {}).get("_type") != "gradio.FileData":
        raise SearchError(NOT_AN_UPLOAD)
    uploads = os.path.realpath(get_upload_folder())
    path = os.path.realpath(value["path"])
    if os.path.commonpath([uploads, path]) != uploads or not os.path.isfile(path):  # one answer for any refusal
        raise SearchError(NOT_AN_UPLOAD)
    return path


def read_upload(value) -> Image.Image | None:
    """The image of an uploaded file (see :func:`uploaded_path`), read by the events themselves, so a file that
    is not an image, or is too large, gets a message naming the uploaded file instead of Gradio's preprocessing
    error."""
    path = uploaded_path(value)
    if path is None:
        return None
    name = value.orig_name if isinstance(value, FileData) else value.get("orig_name")
    try:
        return load_image(path, QUERY_SIDE)
    except DataError as e:
        raise SearchError(str(e).replace(path, name or os.path.basename(path))) from None
