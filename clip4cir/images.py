"""Reading image files: any mode becomes RGB, huge files are refused before they are decoded, and a corrupt,
truncated or non-image file is a DataError naming it."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before they are decoded (a JPEG is decoded smaller)
MAX_SIDE = 4096  # larger images are downscaled before preprocessing


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, whatever its mode; a corrupt, truncated, non-image or huge file raises DataError
    naming it, before a huge one is decoded."""
    too_big = (f"image {path} has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels, the limit "
               f"(scale it down first)")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(too_big)
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise DataError(too_big) from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path} is not an image file that can be read (JPEG, PNG, WebP, ...)") from e
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, L, CMYK, I;16 ...) to RGB; transparency becomes white."""
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
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
