"""An edit's uploaded image and mask, read and checked before any GPU work (issue 52).

Every check names the field it failed on, and runs on the header before the pixels are
decoded where it can: the format (PNG, JPEG or WebP, read from the bytes, not the name), the
upload's size, the pixel count (a decompression bomb is refused before it is decompressed),
then a full decode (a truncated or corrupt file fails here, not on a GPU). A mask is a PNG of
the image's size with an alpha channel: its fully transparent pixels mark where to edit, as
OpenAI's Images API defines it; it becomes the engine's paint mask (white where the model
paints).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from promptserve.engine.base import EditInput
from promptserve.errors import InputError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an image or a mask, as uploaded
MAX_PIXELS = 4096 * 4096  # decoded: a larger image is refused before it is decompressed
FORMATS = {"PNG", "JPEG", "WEBP"}


def read_image(data: bytes, field: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image, decoded and checked; ``field`` names it in every refusal."""
    if not data:
        raise InputError(f"field {field}: the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(
            f"field {field}: {len(data)} bytes, over the {MAX_UPLOAD_BYTES} byte upload limit"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"field {field}: too many pixels (at most {max_pixels})") from None
    except Exception:
        raise InputError(
            f"field {field}: not a PNG, JPEG or WebP image (or one too damaged to read)"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"field {field}: {width}x{height} is over {max_pixels} pixels")
    try:
        image.load()  # the whole file: a truncated one fails here
    except Exception:
        raise InputError(f"field {field}: the image is truncated or corrupt") from None
    return image


def paint_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The uploaded mask as the engine's paint mask: (H, W) uint8, 255 where the mask is fully
    transparent (edit there), 0 elsewhere. It must be a PNG with an alpha channel and the
    image's ``size`` (width, height)."""
    mask = read_image(data, "mask")
    if mask.format != "PNG":
        raise InputError(f"field mask: a PNG is required (got {mask.format})")
    if mask.size != size:
        raise InputError(
            f"field mask: {mask.size[0]}x{mask.size[1]} is not the image's {size[0]}x{size[1]}"
        )
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InputError("field mask: it has no alpha channel (transparent pixels mark the edit)")
    alpha = np.asarray(mask.convert("RGBA"))[:, :, 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def fit(image: Image.Image, size: tuple[int, int] | None, multiple: int) -> Image.Image:
    """The image at the served ``size`` (width, height), or with ``size`` None (``auto``) at
    its own, each side snapped down to ``multiple`` (at least one multiple)."""
    if size is None:
        size = tuple(max(multiple, side - side % multiple) for side in image.size)  # type: ignore[assignment]
    rgb = image.convert("RGB")
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A paint mask at the served ``size`` (width, height): nearest pixel, so it stays 0 or 255."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def overlay(png: bytes, edit: EditInput) -> bytes:
    """An inpainting answer with the input's own pixels outside the mask, as an editor expects:
    the model's VAE decodes the whole latent, so pixels it was told to keep come back close to
    the input, not equal (diffusers' ``apply_overlay`` does this where it crops). Image-to-image
    answers are the model's alone."""
    if edit.mask is None:
        return png
    made = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    kept = np.where(edit.mask[:, :, None] > 127, made, edit.image)
    out = io.BytesIO()
    Image.fromarray(kept.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
