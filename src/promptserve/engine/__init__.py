"""Diffusion engines: ``tiny`` (random weights, CPU), ``diffusers`` (real SD weights), ``modeled``."""

from __future__ import annotations

from promptserve.engine.base import Engine, GenerationItem, GenerationResult
from promptserve.errors import InputError


def make_engine(
    model: str = "tiny",
    backend: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    speedup: float = 1.0,
) -> Engine:
    """``tiny`` or a local diffusers folder; ``backend="modeled"`` sleeps by the reference profile."""
    backend = backend or ("tiny" if model == "tiny" else "diffusers")
    if backend == "tiny":
        from promptserve.engine.tiny import tiny_engine

        return tiny_engine()
    if backend == "diffusers":
        from promptserve.engine.diffusers_backend import diffusers_engine

        return diffusers_engine(model, device, dtype)
    if backend == "modeled":
        from promptserve.engine.modeled import ModeledEngine
        from promptserve.profile import reference_profile

        return ModeledEngine(reference_profile(), speedup=speedup)
    raise InputError(f"backend {backend!r} is not one of: tiny, diffusers, modeled")


__all__ = ["Engine", "GenerationItem", "GenerationResult", "make_engine"]
