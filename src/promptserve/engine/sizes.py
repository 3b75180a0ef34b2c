"""Image sizes: what a server lists, what a request asks for, and each family's usual set.

A size is (width, height) in pixels. Every family's VAE scales by 8, and its denoiser halves
the latent a few more times (the UNet per down block, the transformers by their 2x2 patches),
so a size must be a multiple of the family's ``multiple``. The defaults are the aspect ratios
each family was trained on, at the model's own pixel count: SDXL's buckets around one
megapixel (Stability's published list), SD 1.x/2.x square and about 4:3 either way, SD3 and
Flux the SDXL buckets at multiples of 16 (both were trained on multi-aspect data at about one
megapixel).
"""

from __future__ import annotations

import math
import re

from promptserve.errors import InputError

Size = tuple[int, int]  # (width, height) in pixels

# (width, height) ratios, the square first (the default of ``auto``)
SDXL_BUCKETS = (
    (1, 1),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
)
SD_RATIOS = ((1, 1), (576, 448), (448, 576))
TINY_SIZES: tuple[Size, ...] = ((64, 64), (32, 32), (96, 64), (64, 96))


def parse_size(text: str, field: str = "size") -> Size:
    """``WIDTHxHEIGHT`` as (width, height); a clear error naming ``field`` otherwise."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", text)
    if m is None:
        raise InputError(f"{field}: {text!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0:
        raise InputError(f"{field}: {text!r} has a zero side")
    return width, height


def label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def parse_sizes(text: str, field: str = "--sizes") -> tuple[Size, ...]:
    """A comma-separated list of sizes, no repeats (checked against a model by ``checked``)."""
    sizes: list[Size] = []
    for part in text.split(","):
        size = parse_size(part, field)
        if size in sizes:
            raise InputError(f"{field}: {label(size)} is listed twice")
        sizes.append(size)
    return tuple(sizes)


def checked(sizes: tuple[Size, ...], multiple: int, field: str = "--sizes") -> tuple[Size, ...]:
    """``sizes`` if every side is a multiple of ``multiple`` pixels, else a clear error."""
    for size in sizes:
        if size[0] % multiple or size[1] % multiple:
            raise InputError(
                f"{field}: {label(size)} is not a multiple of {multiple} pixels on both sides "
                "(what this model's latent and denoiser need)"
            )
    return sizes


def family_sizes(ratios, native: Size, multiple: int) -> tuple[Size, ...]:  # noqa: ANN001
    """Each ratio at the native pixel count, rounded to the multiple; the native size first."""
    area = native[0] * native[1]
    out: list[Size] = [native]
    for rw, rh in ratios:
        w = max(multiple, round(math.sqrt(area * rw / rh) / multiple) * multiple)
        h = max(multiple, round(math.sqrt(area * rh / rw) / multiple) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return tuple(out)


def default_sizes(family: str, native: Size, multiple: int) -> tuple[Size, ...]:
    """The usual sizes of a family at its model's own resolution (``native`` first). Full-size
    models round to 64 pixels, as the published buckets are; small test shapes to what the
    model needs."""
    if family == "tiny":
        return TINY_SIZES
    ratios = SD_RATIOS if family == "sd" else SDXL_BUCKETS
    step = max(multiple, 64) if min(native) >= 512 else multiple
    return family_sizes(ratios, native, step)


def shape_table(native: Size, sizes: tuple[Size, ...]) -> tuple[Size, ...]:
    """The sizes a policy times, the model's own first (index 0, what its profile measured),
    then the listed ones in order: a request's ``shape`` is its size's index here."""
    return (native, *[s for s in sizes if s != native])


def shape_index(table: tuple[Size, ...], size: Size | None) -> int:
    """A request's ``shape``: its size's index in ``table`` (None: the model's own, 0)."""
    return 0 if size is None else table.index(size)
