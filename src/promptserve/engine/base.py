"""The engine interface: run a batch of requests, each from its own starting latent and level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np


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


class Engine(Protocol):
    name: str
    total_steps: int
    levels: tuple[int, ...]  # the cache levels K it captures and can resume from (0 included)
    image_px: int  # the side of the square images it makes
    speedup: float  # how many times faster than its profile it runs (1 but for the modelled one)

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]: ...

    def step_runner(self, profile: Profile):  # noqa: ANN201 - a StepRunner or the modelled one
        """What runs its steps under step-level serving (``engine.steprunner``)."""
        ...
