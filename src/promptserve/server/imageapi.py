"""The OpenAI Images API's answers as the official schema defines them
(``data/openai_images_openapi.json``): image bytes in the requested format, the response body
without nulls, and the server-sent events of ``stream: true``."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Sequence

from promptserve.server.runtime import Served
from promptserve.server.schemas import (
    MAX_DEADLINE_MS,
    OFFICIAL_SIZES,
    ImageMeta,
    ImageRequest,
    LoraRef,
)

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_COMPRESSION = 100  # the official default of ``output_compression``
TOKEN = re.compile(r"\w+|[^\w\s]")


def unsupported(req: ImageRequest, job: bool = False) -> tuple[str, str] | None:
    """(field, why) for a request (``job``: a job) this server will not pretend to honour,
    else None."""
    if req.deadline_ms is not None and req.deadline_ms > MAX_DEADLINE_MS and not req.batch(job):
        return (
            "deadline_ms",
            f"deadline_ms over {MAX_DEADLINE_MS} (an hour) is for background work: a job "
            "with priority batch (the default for POST /v1/jobs)",
        )
    if req.webhook_url is not None and not job:
        return "webhook_url", "webhook_url is for jobs (POST /v1/jobs): an answer here is the reply"
    if req.style is not None:
        return "style", "style (DALL-E 3's vivid/natural) has no counterpart in diffusion serving"
    if req.background == "transparent":
        return "background", "transparent backgrounds are not supported: the models draw opaque"
    if req.partial_images and not req.stream:
        return "partial_images", "partial_images needs stream: true"
    if req.stream and req.n != 1:
        return "n", "a stream carries one image: send n = 1 with stream: true"
    if req.stream and req.response_format == "url":
        return (
            "response_format",
            "a stream carries base64 images: response_format url is not streamed",
        )
    return None


def encode_image(png: bytes, output_format: str | None, compression: int | None) -> bytes:
    """The engine's PNG as the requested format; ``compression`` (0-100) is the JPEG/WebP
    quality, as the official field means it (PNG stays lossless)."""
    if output_format in (None, "png"):
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    quality = DEFAULT_COMPRESSION if compression is None else compression
    image.save(out, format=output_format.upper(), quality=quality)
    return out.getvalue()


def served_quality(served: Sequence[Served]) -> str:
    """The official ``quality`` of what was served, on this system's own axis: ``high`` when
    every image was a full generation, ``medium`` when each stayed within the level its prompt
    tolerates (K <= K_opt), ``low`` when any went above it (load pushed it)."""
    if all((s.level == 0 or s.edit is not None) and s.interval == 1 for s in served):
        return "high"  # an edit's start is its own image's, not a cached latent's
    if all(s.level <= s.k_opt or s.edit is not None for s in served):
        return "medium"
    return "low"


def meta_of(s: Served) -> ImageMeta:
    return ImageMeta(
        level_k=s.level,
        k_opt=s.k_opt,
        cache_hit=s.level > 0 and s.edit is None,
        edit_start=s.level if s.edit is not None else None,
        similarity=s.similarity,
        predicted_quality=round(s.quality, 3),
        queue_ms=round(s.queue_s * 1e3, 1),
        compute_ms=round(s.compute_s * 1e3, 1),
        placeholder=s.result.placeholder,
        seed=s.seed,
        guidance_scale=s.guidance,
        lora=[LoraRef(name=n, scale=v) for n, v in s.lora],
        feature_cache_interval=s.interval,
        feature_cache_earlier=[list(seg) for seg in s.earlier],
    )


def image_body(meta: ImageMeta, b64_json: str | None = None, url: str | None = None) -> dict:
    """One official ``Image``: the fields it has, none as null; ``promptserve`` is ours."""
    body: dict = {"b64_json": b64_json} if b64_json is not None else {"url": url}
    body["promptserve"] = meta.model_dump()
    return body


def images_body(created: int, images: list[dict], req: ImageRequest, size: str, q: str) -> dict:
    body = {
        "created": created,
        "data": images,
        "background": "opaque",
        "output_format": req.output_format or "png",
        "quality": q,
    }
    if size in OFFICIAL_SIZES:  # the schema's enum: other sizes are left out, not misreported
        body["size"] = size
    return body


def usage(prompt: str) -> dict:
    """The official usage shape. Diffusion has no output tokens; the input count is the
    prompt's words and punctuation (an estimate: the model's tokenizer is not at the API)."""
    text = len(TOKEN.findall(prompt))
    return {
        "total_tokens": text,
        "input_tokens": text,
        "output_tokens": 0,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
    }


def event(
    kind: str,
    created: int,
    b64: str,
    req: ImageRequest,
    size: str,
    index: int | None = None,
    api: str = "image_generation",
    **extra,
) -> str:
    """One server-sent event in the official shape (``ImageGenPartialImageEvent`` with its
    ``partial_image_index``, or ``ImageGenCompletedEvent`` with ``usage`` and our
    ``promptserve``)."""
    if index is not None:
        extra["partial_image_index"] = index
    data = {
        "type": f"{api}.{kind}",  # image_generation or image_edit
        "b64_json": b64,
        "created_at": created,
        "size": size if size in OFFICIAL_SIZES else "auto",
        "quality": req.quality if req.quality in ("low", "medium", "high") else "auto",
        "background": "opaque",
        "output_format": req.output_format or "png",
        **extra,
    }
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


def error_event(message: str, kind: str = "server_error") -> str:
    """A failure after the stream began: the official client raises it as an ``APIError``."""
    return f"event: error\ndata: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64_of(png: bytes, req: ImageRequest) -> str:
    """One image in the format asked for, as base64 text (run it off the event loop)."""
    return b64(encode_image(png, req.output_format, req.output_compression))


def encoded(outcomes: Sequence[Served], req: ImageRequest) -> list:
    """Each image in the format asked for: bytes for a link, base64 text for ``b64_json``."""
    images = [
        encode_image(s.result.png, req.output_format, req.output_compression) for s in outcomes
    ]
    return images if req.response_format == "url" else [b64(i) for i in images]


def seed_of(req: ImageRequest, i: int) -> int | None:
    """Image ``i``'s seed: the request's plus ``i`` (None: the server picks)."""
    return None if req.seed is None else req.seed + i
