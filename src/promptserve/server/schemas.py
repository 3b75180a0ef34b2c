"""The HTTP API's shapes: the OpenAI Images API (``data/openai_images_openapi.json``) plus
promptserve's extensions. What each official request field does here is in the README's table."""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from promptserve.engine.lora import MAX_ADAPTERS_PER_REQUEST, SCALE_RANGE

MAX_PROMPT_CHARS = 4000
MAX_IMAGES = 10  # the official limit of ``n``
OFFICIAL_SIZES = ("1024x1024", "1024x1536", "1536x1024")  # the response schema's ``size`` enum


# categories that draw nothing on their own: separators and spaces, controls, format characters
# (zero-width space and joiners, BOM, word joiner), unassigned, and combining marks
BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cn", "Mn", "Me"})
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # Hangul fillers, braille blank


def visible(prompt: str) -> bool:
    """Whether the prompt has a character that draws: prompts made only of spaces or zero-width
    characters say nothing, and would all match one another in the cache at similarity 1."""
    return any(
        not c.isspace()
        and c not in BLANK_LETTERS
        and unicodedata.category(c) not in BLANK_CATEGORIES
        for c in prompt
    )


MAX_DEADLINE_MS = 3_600_000  # the longest deadline an interactive request may ask (an hour)
MAX_BATCH_DEADLINE_MS = 7 * 24 * 3_600_000  # a background job's (a week)
BATCH_DEADLINE_MS = 24 * 3_600_000  # a background job's when it names none (a day)


class LoraRef(BaseModel):
    """One adapter a request runs with (``serve --lora-dir``'s ``NAME.safetensors``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    scale: float = Field(default=1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1])


class ImageRequest(BaseModel):
    # an unknown field is named, not ignored; strict: "4" is not 4, true is not 1, 1 is not true
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # the engine's size or "auto", checked by the app
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = Field(default=None, max_length=256)
    # extensions
    deadline_ms: int | None = Field(default=None, ge=100, le=MAX_BATCH_DEADLINE_MS)
    # interactive: someone waits (the default for generations and edits); batch: background
    # work on what interactive requests leave, paused when they need the GPU (the default
    # for jobs; a deadline of hours)
    priority: Literal["interactive", "batch"] | None = None
    # a job's: told how it ended, signed (``server.webhooks``), to a host the server allows
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2048)
    # the start noise: the same prompt, seed, level and neighbour give the same image (with
    # n > 1, image i has seed + i); default one of the server's own
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - MAX_IMAGES)
    # what guidance steers away from; and its scale, in the model's range (``GET /v1/server``);
    # a request with either resumes only from neighbours made with the same ones
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    guidance_scale: float | None = None
    # LoRA adapters by name, each at its scale; none repeated (a request resumes only from
    # neighbours made with the same adapters and scales)
    lora: list[LoraRef] | None = Field(default=None, max_length=MAX_ADAPTERS_PER_REQUEST)

    def batch(self, job: bool) -> bool:
        """Background work: asked for, or a job that did not ask to be interactive."""
        return self.priority == "batch" if not job else self.priority != "interactive"

    @property
    def exact(self) -> bool:
        """``high`` (and DALL-E's ``hd``): full generation only, never from a cached latent."""
        return self.quality in ("high", "hd")


class ImageMeta(BaseModel):
    level_k: int  # denoising steps skipped (0: full generation)
    k_opt: int = 0  # the level its cached neighbour's similarity tolerates (0: a miss)
    cache_hit: bool = False  # True when it started from a cached latent (level_k > 0)
    similarity: float | None  # to the cached neighbour it started from
    predicted_quality: float  # percent of full generation, by the quality model
    queue_ms: float
    compute_ms: float
    placeholder: bool  # True: the image is not a real rendering (tiny or modelled engine)
    seed: int = 0  # its start noise's seed (the request's, or the server's own)
    guidance_scale: float | None = None  # the scale it ran at (None: no guidance input)
    lora: list[LoraRef] = []  # the adapters it ran with
    feature_cache_interval: int = 1  # a full denoiser step every this many (1: every step)
    # [interval, steps] it ran at before ``feature_cache_interval``: a burst raised it mid-run
    feature_cache_earlier: list[list[int]] = []
    edit_start: int | None = None  # an edit: the step it started at from its own image


class ImageData(BaseModel):
    """The official ``Image``: absent fields are left out (answers drop every None), never
    sent as null; ``promptserve`` is our extension."""

    b64_json: str | None = None
    url: str | None = None
    promptserve: ImageMeta


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    size: str | None = None  # only when it is one of the official sizes
    quality: Literal["low", "medium", "high"] | None = None
