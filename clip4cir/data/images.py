"""Reading image files: any mode becomes RGB, turned upright as its EXIF orientation says (a phone photo stored
sideways), huge files are refused before they are decoded, decoding is bounded in pixels at once across threads,
special files (FIFOs, devices) are never opened for reading, reads have a time limit, and a corrupt, truncated or
non-image file is a DataError naming it."""
from __future__ import annotations

import io
import math
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip4cir.core.errors import BusyError, DataError

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before they are decoded (a JPEG is decoded smaller)
MAX_SIDE = 4096  # larger images are downscaled before preprocessing
MAX_FILE_BYTES = 512 * 2 ** 20  # no image file of a catalog or an upload is larger
READ_TIMEOUT = 30.0  # seconds a file may take to read (a stalled network share fails instead of hanging)
JPEG_SCALES = (1, 2, 4, 8)  # the reductions a JPEG decoder offers
ORIENTATION = 0x0112  # the EXIF tag of how the stored pixels are turned
DECODE_PIXELS = 2 * MAX_IMAGE_PIXELS  # pixels being decoded at once in a process, all threads together
DECODE_WAIT = 30.0  # seconds a decode waits for its share of DECODE_PIXELS before the caller is told to retry
Image.MAX_IMAGE_PIXELS = None  # decode_image's own limits apply (PIL's would refuse a JPEG it can decode smaller)


class PixelBudget:
    """At most ``limit`` pixels decoded at once across threads (a decode waits for its share): memory stays
    bounded under any number of concurrent large images."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout: float = DECODE_WAIT) -> Iterator[None]:
        pixels = min(pixels, self.limit)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + pixels <= self.limit, timeout):
                raise BusyError("too many large images are being read at once; try again in a moment")
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


DECODING = PixelBudget(DECODE_PIXELS)


def read_file(path: str | os.PathLike, limit: int = MAX_FILE_BYTES, timeout: float = READ_TIMEOUT) -> bytes:
    """The bytes of a regular file: a FIFO, device or folder is refused without blocking (opened non-blocking,
    checked with fstat), a file over ``limit`` bytes is refused, and a read longer than ``timeout`` seconds is
    an error rather than a hung worker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
    result: dict = {}

    def read() -> None:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                result["error"] = f"{path} is not a regular file"
            elif info.st_size > limit:
                result["error"] = f"{path} has {info.st_size:,} bytes, more than the {limit:,} an image may have"
            else:
                chunks, size = [], 0
                while chunk := os.read(fd, 2 ** 20):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        result["error"] = f"{path} has more than the {limit:,} bytes an image may have"
                        return
                result["data"] = b"".join(chunks)
        except OSError as e:
            result["error"] = f"cannot read image {path}: {e.strerror or e}"
        finally:
            os.close(fd)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():  # the reader closes the file when (if ever) its read returns
        raise DataError(f"reading {path} took more than {timeout:g} s; is its storage reachable?")
    if "error" in result:
        raise DataError(result["error"])
    return result["data"]


def _draft_size(width: int, height: int) -> tuple[int, int] | None:
    """The size to ask a JPEG decoder for so that the decoded image has at most MAX_IMAGE_PIXELS (None: it cannot
    be reduced that far)."""
    for scale in JPEG_SCALES:
        w, h = math.ceil(width / scale), math.ceil(height / scale)
        if w * h <= MAX_IMAGE_PIXELS:
            return w, h
    return None


def decode_image(data: bytes, name: str, max_side: int = MAX_SIDE) -> Image.Image:
    """Decode image bytes as RGB, whatever the mode, upright, at most ``max_side`` pixels a side; ``name`` (the
    file) is what error messages show. A JPEG over MAX_IMAGE_PIXELS or larger than needed is decoded at a reduced
    scale; other huge images are refused before decoding."""
    too_big = (f"image {name} has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels, the limit "
               f"(scale it down first)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                size = _draft_size(image.width, image.height)
                if size is not None:  # decode at 1/2, 1/4 or 1/8 of the size where that is still max_side
                    image.draft("RGB", min(size, _side_fit(image.size, max_side)))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(too_big)
            with DECODING.hold(image.width * image.height):
                image.load()
                return to_rgb(image, max_side)
    except Image.DecompressionBombError as e:
        raise DataError(too_big) from e
    except UnidentifiedImageError as e:
        raise DataError(f"{name} is not an image file that can be read (JPEG, PNG, WebP, ...)") from e
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {name}: {e}") from e


def _side_fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size of an image of ``size`` scaled to fit ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def load_image(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Image.Image:
    """Open an image file as RGB (see :func:`read_file` and :func:`decode_image`); a special, huge, corrupt,
    truncated or non-image file raises DataError naming it."""
    return decode_image(read_file(path), str(path), max_side)


def check_image_file(path: str | os.PathLike) -> None:
    """Check, without decoding the pixels, that a file is a complete image: a regular file, a header an image
    reader recognises, and for JPEG and PNG the end marker (a truncated file lacks it). DataError naming it."""
    path = str(path)
    try:
        info = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file")
    try:
        with Image.open(path) as image:
            kind = image.format
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path} is not an image file that can be read ({type(e).__name__})") from None
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(kind)
    if marker:
        with open(path, "rb") as f:
            f.seek(max(0, info.st_size - 1024))
            if marker not in f.read():
                raise DataError(f"image {path} is truncated (its {kind} end marker is missing)")


def to_rgb(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, L, CMYK, I;16 ...) to RGB, upright as its EXIF orientation says, at most
    ``max_side`` pixels a side; transparency becomes white."""
    if (image.getexif().get(ORIENTATION) or 1) != 1:
        image = ImageOps.exif_transpose(image)
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")
