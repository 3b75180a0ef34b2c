"""An edit's upload (``server/editinput.py``): every bad file is refused naming its field,
before any pixel reaches an engine; a good mask becomes the engine's paint mask."""

import io

import numpy as np
import pytest
from PIL import Image

from promptserve.errors import InputError
from promptserve.server.editinput import MAX_UPLOAD_BYTES, fit, fit_mask, paint_mask, read_image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def photo(w: int = 40, h: int = 24) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_three_formats_are_read_whatever_the_file_is_called(fmt):
    image = read_image(encoded(photo(), fmt))
    assert image.size == (40, 24) and image.format == fmt


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 64, "not a PNG, JPEG or WebP"),
        (encoded(photo(), "PNG")[:60], "truncated or corrupt|not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a PNG"),
        (encoded(Image.new("RGB", (20, 20)), "GIF"), "not a PNG, JPEG or WebP"),
    ],
)
def test_a_bad_image_is_refused_naming_its_field(data, why):
    with pytest.raises(InputError, match=rf"field image: .*({why})"):
        read_image(data)


def test_a_decompression_bomb_and_an_oversized_upload_are_refused_before_decoding():
    bomb = encoded(Image.new("L", (5000, 5000)))  # a few KB on the wire, 25M pixels decoded
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match="field image: 5000x5000 is over"):
        read_image(bomb)
    with pytest.raises(InputError, match="upload limit"):
        read_image(b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 1))


def test_a_mask_marks_its_transparent_pixels_and_must_match_the_image():
    rgba = np.full((24, 40, 4), 255, dtype=np.uint8)
    rgba[5:10, 3:20, 3] = 0  # fully transparent: edit here
    rgba[12, 12, 3] = 128  # half transparent: kept
    mask = paint_mask(encoded(Image.fromarray(rgba, "RGBA")), (40, 24))
    assert mask.shape == (24, 40) and set(np.unique(mask)) == {0, 255}
    assert (mask[5:10, 3:20] == 255).all() and mask.sum() == 255 * 5 * 17
    with pytest.raises(InputError, match="field mask: 40x24 is not the image's 64x64"):
        paint_mask(encoded(Image.fromarray(rgba, "RGBA")), (64, 64))
    with pytest.raises(InputError, match="field mask: it has no alpha channel"):
        paint_mask(encoded(photo()), (40, 24))
    with pytest.raises(InputError, match="field mask: a PNG is required"):
        paint_mask(encoded(photo(), "JPEG"), (40, 24))


def test_auto_snaps_the_image_s_own_size_and_a_mask_follows_it():
    assert fit(photo(70, 45), None, 16).size == (64, 32)
    assert fit(photo(10, 45), None, 16).size == (16, 32)  # at least one multiple
    assert fit(photo(), (64, 64), 16).size == (64, 64)
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[:, :20] = 255
    out = fit_mask(mask, (80, 48))
    assert out.shape == (48, 80) and set(np.unique(out)) == {0, 255} and (out[:, :40] == 255).all()
