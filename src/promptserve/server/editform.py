"""``POST /v1/images/edits``: its ``multipart/form-data`` read into the request a generation
is (``ImageRequest``, so that every check and extension is the generations' own) and the
edit's input (``EditInput``), every refusal naming its field before any GPU work.

A form carries text: the numbers, booleans and the adapter list are parsed here, as the
official client sends them (``extra_body`` fields become form fields; a list of objects
``lora[][name]``, ``lora[][scale]``; ``lora`` as a JSON string is taken too).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace

import numpy as np
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from promptserve.engine.base import EditInput
from promptserve.engine.sizes import label, parse_size
from promptserve.errors import InputError
from promptserve.server.context import Context, error, first_problem
from promptserve.server.editinput import (
    MAX_UPLOAD_BYTES,
    fit,
    fit_mask,
    overlay,
    paint_mask,
    read_image,
)
from promptserve.server.requests import Served
from promptserve.server.schemas import ImageRequest
from promptserve.strength import (
    DEFAULT_MASKED_STRENGTH,
    DEFAULT_STRENGTH,
    INSTRUCTION_EDITS,
    images_taken,
)

# the official edit fields that have no counterpart here: named, never ignored
REFUSED = {
    "input_fidelity": "input_fidelity (GPT Image's) has no counterpart: use strength",
    "complexity": "complexity has no counterpart in diffusion serving",
    "frame_count": "animated output is not served",
    "frame_duration_ms": "animated output is not served",
    "markup": "markup images are not served",
    "svg": "SVG output is not served",
}
INTS = ("n", "output_compression", "partial_images", "seed", "deadline_ms")
# the form as the OpenAPI document describes it (what schemathesis sends in
# ``make reliability``): the upload and the text fields, each as a form carries it
_TEXT = {"type": "string"}
EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "mask": {"type": "string", "format": "binary"},
                        "prompt": _TEXT,
                        "n": {"type": "integer"},
                        "size": _TEXT,
                        "response_format": _TEXT,
                        "output_format": _TEXT,
                        "stream": {"type": "boolean"},
                        "partial_images": {"type": "integer"},
                        "user": _TEXT,
                        "strength": {"type": "number"},
                        "seed": {"type": "integer"},
                        "negative_prompt": _TEXT,
                        "guidance_scale": {"type": "number"},
                        "lora": _TEXT,
                        "deadline_ms": {"type": "integer"},
                        "priority": _TEXT,
                    },
                }
            }
        },
    }
}
FLOATS = ("guidance_scale",)
BOOLS = ("stream",)
MAX_FIELDS = 64  # text fields in one form: a request has a few dozen at most


@dataclass(frozen=True)
class EditForm:
    req: ImageRequest
    image: bytes
    mask: bytes | None
    strength: float | None  # None: the default (``DEFAULT_STRENGTH``, masked or not)
    more: tuple[bytes, ...] = ()  # images after the first (a model that reads several)


async def read_form(request: Request) -> EditForm:
    """The form, parsed and typed; an ``InputError`` names the field it failed on."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise InputError(
            f"content-type: an edit is multipart/form-data (got {kind.split(';')[0] or 'none'})"
        )
    try:
        form = await request.form(
            max_files=4, max_fields=MAX_FIELDS, max_part_size=MAX_UPLOAD_BYTES + 1
        )
    except Exception as exc:  # a malformed body, or a part over the limit
        raise InputError(f"body: not a readable multipart form ({exc})") from None
    try:
        return parse_edit_form(form)
    finally:
        await form.close()


def parse_edit_form(form: FormData) -> EditForm:
    """A read form's fields, typed and checked (``read_form`` reads it first)."""
    images = [v for k in ("image", "image[]") for v in form.getlist(k)]
    if not images:
        raise InputError("image: an image file is required")
    image, *more = (_file(one, "image") for one in images)  # how many: ``read_edit`` checks
    mask = _file(form["mask"], "mask") if "mask" in form else None
    fields: dict[str, object] = {}
    lora: list[dict[str, object]] = []
    for key, value in form.multi_items():
        if key in ("image", "image[]", "mask"):
            continue
        if isinstance(value, UploadFile):
            raise InputError(f"{key}: a file where text is expected")
        if key in REFUSED:
            raise InputError(f"{key}: {REFUSED[key]}")
        if key.startswith("lora[]["):  # the client's flattening of [{"name", "scale"}]
            sub = key[len("lora[][") : -1]
            if not lora or sub in lora[-1]:
                lora.append({})
            lora[-1][sub] = float(_number(value, key)) if sub == "scale" else value
            continue
        if key in fields:
            raise InputError(f"{key}: given more than once")
        fields[key] = _typed(key, value)
    if lora:
        fields["lora"] = lora
    strength = fields.pop("strength", None)
    try:
        req = ImageRequest.model_validate(fields)
    except ValidationError as exc:  # worded as the generations route words it
        raise InputError(first_problem(exc.errors())[1]) from None
    return EditForm(req, image, mask, strength, tuple(more))  # type: ignore[arg-type]


def _file(value: object, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise InputError(f"{field}: a file is required, not text")
    data = value.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"{field}: over the {MAX_UPLOAD_BYTES} byte upload limit")
    return data


def _typed(key: str, value: str) -> object:
    """A form field's text as the type ``ImageRequest`` (or ``strength``) takes."""
    if key in INTS:
        number = _number(value, key)
        if not float(number).is_integer():
            raise InputError(f"{key}: {value!r} is not a whole number")
        return int(number)
    if key in FLOATS or key == "strength":
        number = float(_number(value, key))
        if key == "strength" and not 0.0 < number <= 1.0:
            raise InputError(f"strength: {value} is not in (0, 1]")
        return number
    if key in BOOLS:
        if value.lower() not in ("true", "false"):
            raise InputError(f"{key}: {value!r} is not true or false")
        return value.lower() == "true"
    if key == "lora":
        try:
            return json.loads(value)
        except ValueError:
            raise InputError("lora: not a JSON list of {name, scale}") from None
    return value


def _number(value: str, key: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{key}: {value!r} is not a number") from None
    if not np.isfinite(number):
        raise InputError(f"{key}: {value!r} is not a finite number")
    return number


async def read_edit(
    ctx: Context, request: Request
) -> tuple[ImageRequest, EditInput] | JSONResponse:
    """The request and the edit's input, or the error to answer: the form's, then the
    caller's key, prompt and size (as a generation's), then the image's, in that order, so
    that nothing is decoded for a caller who may not ask."""
    try:
        form = await read_form(request)
    except InputError as exc:
        return error(400, str(exc), str(exc).split(":")[0])
    req = form.req
    checked = ctx.checked_tenant(req, request, editing=True)
    if isinstance(checked, JSONResponse):
        return checked
    family = ctx.runtime.workers.edit_family
    if form.mask is not None and family in INSTRUCTION_EDITS:
        why = "an instruction-edit model edits the whole image as the prompt says"
        return error(400, f"mask: not served: {why}", "mask")
    if 1 + len(form.more) > images_taken(family):
        taken = images_taken(family)
        return error(
            400, f"image: {1 + len(form.more)} images given; this model takes {taken} per edit",
            "image",
        )  # fmt: skip
    asked = None if req.size in (None, "auto") else parse_size(req.size)
    try:
        edit, size = await asyncio.to_thread(edit_input, form, ctx.runtime.workers.sizes, asked)
    except InputError as exc:
        return error(400, str(exc), str(exc).split(":")[0].removeprefix("field "))
    return req.model_copy(update={"size": label(size)}), edit


def edit_input(
    form: EditForm, served: tuple[tuple[int, int], ...], size: tuple[int, int] | None
) -> tuple[EditInput, tuple[int, int]]:
    """The decoded image (and paint mask) at the size served, and that size: the one asked for,
    or (``auto``, none) the served size nearest the image's shape (its aspect ratio, then its
    area), since the policy times only the sizes it serves. Runs the decodes: call it off the
    event loop."""
    image = read_image(form.image)
    mask = paint_mask(form.mask, image.size) if form.mask is not None else None
    if size is None:
        size = nearest_size(served, image.size)
    strength = form.strength
    if strength is None:
        strength = DEFAULT_MASKED_STRENGTH if mask is not None else DEFAULT_STRENGTH
    pixels = np.asarray(fit(image, size, 1))
    more = tuple(np.asarray(read_image(data).convert("RGB")) for data in form.more)  # own sizes
    masked = fit_mask(mask, size) if mask is not None else None
    return EditInput(pixels, strength, masked, more), size


def nearest_size(served: tuple[tuple[int, int], ...], own: tuple[int, int]) -> tuple[int, int]:
    """The served (width, height) closest to ``own`` in aspect ratio, then in pixels."""
    ratio = own[0] / own[1]
    return min(
        served,
        key=lambda s: (
            round(abs(np.log(s[0] / s[1] / ratio)), 6),
            abs(s[0] * s[1] - own[0] * own[1]),
        ),
    )


def overlaid(outcomes: list[Served], edit: EditInput) -> list[Served]:
    """Inpainting answers with the input's pixels outside the mask (``editinput.overlay``)."""
    return [replace(s, result=replace(s.result, png=overlay(s.result.png, edit))) for s in outcomes]
