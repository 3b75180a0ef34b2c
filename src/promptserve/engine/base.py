"""The engine interface: run a batch of requests, each from its own starting latent and level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Look:
    """What steers an image besides its prompt and start noise. A latent made under one look
    is a different point than under another, so the cache keeps each look's entries apart
    (``cache_space``); the default look is the plain request's."""

    negative_prompt: str = ""  # what guidance steers away from (the empty prompt by default)
    guidance: float | None = None  # the guidance scale; None: the engine's own default
    size: tuple[int, int] | None = None  # (width, height) in pixels; None: the model's own
    lora: tuple[tuple[str, float], ...] = ()  # (adapter, scale) pairs, in the request's order

    @property
    def plain(self) -> bool:
        return (
            not self.negative_prompt and self.guidance is None and self.size is None
            and not self.lora
        )  # fmt: skip


PLAIN = Look()  # the plain request's look


SCALE_STEP = 0.01  # the resolution at which guidance and adapter scales are served


@dataclass(frozen=True, slots=True)
class Guidance:
    """What a family's guidance scale means and the range served. ``cfg``: classifier-free
    guidance against a negative prompt (SD 1.x, SDXL, SD3); ``distilled``: a conditioning input
    of the model with no negative pass (Flux dev); ``none``: nothing to set (Flux schnell)."""

    kind: Literal["cfg", "distilled", "none"]
    default: float
    low: float = 1.0
    high: float = 20.0

    @property
    def negative(self) -> bool:
        return self.kind == "cfg"

    def refusal(self, negative_prompt: str | None, scale: float | None) -> tuple[str, str] | None:
        """(field, why) for a look this family cannot serve, else None."""
        if negative_prompt and not self.negative:
            why = (
                "its guidance is distilled: there is no negative pass"
                if self.kind == "distilled"
                else "it has no guidance"
            )
            return "negative_prompt", f"negative_prompt is not served for this model: {why}"
        if scale is None:
            return None
        if self.kind == "none":
            return (
                "guidance_scale",
                "guidance_scale is not served for this model: it has no guidance input",
            )
        if not (self.low <= scale <= self.high) or scale != scale:
            what = (
                "classifier-free guidance"
                if self.kind == "cfg"
                else "distilled guidance (an input of the model, not CFG)"
            )
            return (
                "guidance_scale",
                f"guidance_scale {scale:g} is outside {self.low:g}-{self.high:g}, this model's {what} range (default {self.default:g})",
            )
        return None

    def look(
        self,
        negative_prompt: str | None,
        scale: float | None,
        size: tuple[int, int] | None = None,
        lora: tuple[tuple[str, float], ...] = (),
    ) -> Look:
        """A request's look, the default scale spelt out or not being the same look; an adapter
        at scale 0 adds nothing, so it is left out. Scales are taken to ``SCALE_STEP``: finer
        differences change no image anyone can tell apart, and each distinct look is a cache
        namespace of its own (7.0 + i·1e-9 would be a new one per request)."""
        scale = None if scale is None else snap(scale)
        scale = None if scale == self.default else scale
        adapters = tuple((n, snap(s)) for n, s in lora if snap(s))
        return Look(negative_prompt or "", scale, size, adapters)


def snap(scale: float) -> float:
    """A guidance or adapter scale to the served resolution, ``SCALE_STEP``."""
    return round(round(float(scale) / SCALE_STEP) * SCALE_STEP, 6)


UNET_GUIDANCE = Guidance("cfg", 7.5)


@dataclass(frozen=True)
class GenerationItem:
    """One image to make.

    ``k`` is the number of denoising steps skipped; ``start_latent`` is the latent after ``k``
    steps (a cached neighbour's) and must be given when ``k`` > 0; at ``k`` = 0 the run starts
    from noise drawn with ``seed``. Items of one batch may have different ``k``: engines run
    each level's items together (the interface leaves room for step-level batching).
    """

    prompt: str
    k: int = 0
    start_latent: np.ndarray | None = None
    seed: int = 0
    # steps after which the caller wants a preview: the predicted clean image, decoded
    # (streaming partial images); the engine passes each to ``on_step(step, {row: png})``
    previews: tuple[int, ...] = ()
    look: Look = PLAIN
    interval: int = 1  # feature caching: a full step every ``interval`` steps (1: every step)
    edit: EditInput | None = None  # an edit: it starts from its own image (``engine.edits``)
    # a paused member going on (background work): it joins at the step it was written down
    # at, from its latent, and runs as it would have without the pause
    resume: Paused | None = None


@dataclass(frozen=True)
class Paused:
    """A member written down between two steps (``StepRunner.pause``): its latent after
    ``step`` steps and the cache levels it had captured, what a resume needs to go on exactly
    (on this worker or another; arrays, so it travels and is stored as it is)."""

    step: int
    latent: np.ndarray  # (C, H, W), in the runner's dtype but for bfloat16 (kept as float32)
    dtype: str  # the runner's torch dtype, to put it back in
    captured: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class EditInput:
    """An edit's input, as it travels to the worker that runs it (where the VAE is): the
    image and the mask as decoded RGB and L pixels of the served size (the mask white where
    the model paints), and the strength. Its start step and latent are made at its join."""

    image: np.ndarray  # (H, W, 3) uint8
    strength: float
    mask: np.ndarray | None = None  # (H, W) uint8; None: image-to-image
    # an instruction edit reading several images (Qwen-Image-Edit): those after ``image``,
    # each at its own size
    more: tuple[np.ndarray, ...] = ()


@dataclass
class GenerationResult:
    png: bytes
    k: int
    latents: dict[int, np.ndarray] = field(
        default_factory=dict
    )  # level -> latent after that many steps
    final_latent: np.ndarray | None = None
    placeholder: bool = False  # True when the image is not a real rendering (tiny or modelled)
    # set by a worker that keeps latents in the shared store itself: K -> bytes it wrote (the
    # arrays then stay out of ``latents``), or why writing failed
    stored: dict[int, int] | None = None
    store_error: str | None = None


def preview_steps(k: int, total_steps: int, count: int) -> tuple[int, ...]:
    """``count`` steps spread evenly over the steps a run from K does (a resumed run has
    fewer to show), never the last one (the final image is not a preview)."""
    remaining = total_steps - k
    steps = {k + round(remaining * (i + 1) / (count + 1)) for i in range(count)}
    return tuple(sorted(s for s in steps if k < s < total_steps))


if TYPE_CHECKING:
    from promptserve.profile import Profile


@dataclass(frozen=True)
class EngineCaps:
    """What an engine can do, named where a server decides by it (not probed)."""

    feature_cache: bool = False  # runs members at feature-cache intervals above 1
    stateless: bool = False  # one instance may stand for every worker (it keeps no state)
    modelled: bool = False  # it sleeps its profile's times: no components to time a step on


class Engine(Protocol):
    name: str
    caps: EngineCaps
    total_steps: int
    levels: tuple[int, ...]  # the cache levels K it captures and can resume from (0 included)
    native: tuple[int, int]  # its own (width, height): what a look without a size makes
    sizes: tuple[tuple[int, int], ...]  # (width, height) it serves; the first is ``auto``'s
    speedup: float  # how many times faster than its profile it runs (1 but for the modelled one)
    guidance_spec: Guidance  # what ``guidance_scale`` means for it, and the range it serves
    edit_family: str  # how an edit's strength becomes its start step (``strength.start_step``)

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]: ...

    def step_runner(self, profile: Profile):  # noqa: ANN201 - a StepRunner or the modelled one
        """What runs its steps under step-level serving (``engine.steprunner``)."""
        ...
