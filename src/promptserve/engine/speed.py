"""The engine's speed against the library it wraps, measured side by side in one run.

Both sides do the same work: text encoding, the denoising loop from the same start latents,
VAE decode and PNG files out. Ours is ``DenoisingEngine.generate`` (which also keeps the
latents at every cache level, as it does when serving); theirs is diffusers' pipeline
``__call__`` on the same modules and scheduler (``pipelines.pipeline_for``) with its images saved
as PNG. The two alternate, first one then the other leading, and each side's best of
``repeats`` counts, so a noisy neighbour or a clock ramp slows both rather than one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import torch

from promptserve.engine.base import GenerationItem
from promptserve.engine.pipelines import pipeline_call, pipeline_for
from promptserve.engine.tiny import DenoisingEngine


def synced(device: str) -> Callable[[], float]:
    """A clock that waits for the device's queued work first."""

    def clock() -> float:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    return clock


def best_of(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def vs_diffusers(
    engine: DenoisingEngine,
    batch: int = 1,
    repeats: int = 3,
    ours_engine: DenoisingEngine | None = None,
) -> dict[str, float]:
    """Seconds per call for ours and diffusers', and the ratio theirs / ours (> 1: ours is
    faster), for ``batch`` prompts from noise over the engine's whole schedule.
    ``ours_engine``: ours is that engine (speed options on) over the same modules, diffusers'
    pipeline plain."""
    c = engine.c
    prompts = [f"a lighthouse at dusk, view {i}" for i in range(batch)]
    items = [GenerationItem(p, 0, seed=i) for i, p in enumerate(prompts)]
    starts = torch.cat([c.noise(i) for i in range(batch)])
    pipe = pipeline_for(c, engine.guidance)
    clock = synced(c.device)
    engine = ours_engine or engine

    def ours() -> None:
        engine.generate(items)

    def theirs() -> None:
        for image in pipeline_call(pipe, c, prompts, starts, engine.total_steps, engine.guidance):
            image.save(io.BytesIO(), format="PNG")

    return alternated(ours, theirs, repeats, clock)


def edit_vs_diffusers(engine: DenoisingEngine, images: int = 2, repeats: int = 3) -> dict:
    """``vs_diffusers`` for an instruction-edit model that reads several images
    (Qwen-Image-Edit): one edit of ``images`` images, from the same noise on both sides."""
    import numpy as np
    from PIL import Image

    from promptserve.engine.base import EditInput
    from promptserve.engine.flow import pack

    c = engine.c
    rng = np.random.default_rng(0)
    pixels = [(rng.random((64, 64 - 16 * i, 3)) * 255).astype(np.uint8) for i in range(images)]
    item = GenerationItem(
        "make the sky red", seed=3, edit=EditInput(pixels[0], 1.0, None, tuple(pixels[1:]))
    )
    pipe = pipeline_for(c, engine.guidance)
    width, height = c.native
    start = pack(c.noise(3))
    clock = synced(c.device)

    def ours() -> None:
        engine.generate([item])

    def theirs() -> None:
        made = pipe(
            image=[Image.fromarray(p) for p in pixels], prompt="make the sky red",
            latents=start, height=height, width=width, num_inference_steps=engine.total_steps,
        ).images  # fmt: skip
        made[0].save(io.BytesIO(), format="PNG")

    return alternated(ours, theirs, repeats, clock)


def alternated(ours, theirs, repeats: int, clock) -> dict[str, float]:  # noqa: ANN001
    """Each side's best of ``repeats``, the order alternating; and theirs / ours."""
    ours(), theirs()  # warm-up: allocator, kernels, lazy imports
    ours_s = theirs_s = float("inf")
    for i in range(repeats):  # the order alternates: neither side always runs second
        for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            t = best_of(side, 1, clock)
            if side is ours:
                ours_s = min(ours_s, t)
            else:
                theirs_s = min(theirs_s, t)
    return {"ours_s": ours_s, "diffusers_s": theirs_s, "ratio": theirs_s / ours_s}
