"""The HTTP API's shapes: the OpenAI Images API plus promptserve's extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 4000


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    size: str | None = None  # checked against the engine's sizes by the app
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(default=None, max_length=256)
    # extensions
    deadline_ms: int | None = Field(default=None, ge=100, le=3_600_000)


class ImageMeta(BaseModel):
    level_k: int  # denoising steps skipped (0: full generation)
    k_opt: int = 0  # the level its cached neighbour's similarity tolerates (0: a miss)
    cache_hit: bool = False  # True when it started from a cached latent (level_k > 0)
    similarity: float | None  # to the cached neighbour it started from
    predicted_quality: float  # percent of full generation, by the quality model
    queue_ms: float
    compute_ms: float
    placeholder: bool  # True: the image is not a real rendering (tiny or modelled engine)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    promptserve: ImageMeta


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
