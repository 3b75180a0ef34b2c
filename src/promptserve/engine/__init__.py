"""Diffusion engines: ``tiny`` (random weights, CPU), ``diffusers`` (real SD weights), ``modeled``."""

from __future__ import annotations

from promptserve.engine.base import Engine, GenerationItem, GenerationResult
from promptserve.engine.options import EngineOptions
from promptserve.errors import InputError


def resolved_dtype(dtype: str, device: str) -> str:
    """``auto``: half precision on a GPU (what the published figures and every diffusers
    recipe for SDXL, SD3 and Flux use; half the memory, the fast kernels), float32 on the CPU
    (whose half-precision kernels are slow or missing)."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "float16"


def make_engine(
    model: str = "tiny",
    backend: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    speedup: float = 1.0,
    options: EngineOptions | None = None,
    sizes: tuple[tuple[int, int], ...] | None = None,
    lora_dir: str | None = None,
    lora_resident: int = 8,
    lora_resident_bytes: int | None = None,
    lora_private: bool = False,
    steps: int | None = None,
) -> Engine:
    """``tiny`` or a local diffusers folder; ``backend="modeled"`` sleeps by the reference profile.
    ``options`` (speed: compile, CUDA graphs, channels-last, attention kernel) apply to the
    models that compute (tiny, diffusers). ``sizes``: what it serves (default its family's);
    ``lora_dir``: the adapters it serves (``engine.lora``), ``lora_resident`` of them (and at
    most ``lora_resident_bytes`` of their rows) on the device at once (``lora_private``: each
    only while a call names it). ``steps``: the schedule's length (default the family's: a
    few-step checkpoint is served with its own, e.g. 4 or 8); the levels follow it."""
    engine = _engine(model, backend, device, dtype, speedup, options, steps)
    if sizes:
        engine.set_sizes(sizes)
    if lora_dir:
        engine.load_adapters(lora_dir, lora_resident, lora_resident_bytes, lora_private)
    return engine


def _engine(model, backend, device, dtype, speedup, options, steps=None) -> Engine:  # noqa: ANN001
    backend = backend or ("tiny" if model == "tiny" else "diffusers")
    if backend == "modeled" and steps:
        raise InputError("--steps: the modelled backend runs the SDXL reference's 50 steps")
    if backend in ("tiny", "diffusers"):
        if backend == "tiny":
            from promptserve.engine.diffusers_backend import levels_for
            from promptserve.engine.tiny import tiny_engine

            engine = tiny_engine(steps, levels_for(steps)) if steps else tiny_engine()
        else:
            from promptserve.engine.diffusers_backend import diffusers_engine

            engine = diffusers_engine(model, device, resolved_dtype(dtype, device), steps)
        if options is not None and options != EngineOptions():
            from promptserve.engine.options import apply_options

            apply_options(engine.c, options)
        return engine
    if backend == "modeled":
        from promptserve.engine.modeled import ModeledEngine
        from promptserve.profile import reference_profile

        return ModeledEngine(reference_profile(), speedup=speedup)
    raise InputError(f"backend {backend!r} is not one of: tiny, diffusers, modeled")


__all__ = ["Engine", "GenerationItem", "GenerationResult", "make_engine"]
