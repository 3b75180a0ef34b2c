"""Real Stable Diffusion 1.x/2.x weights through diffusers, run by the same resumable loop.

Loads a pipeline folder (or a hub id the user has cached) and keeps its UNet, VAE, text encoder
and tokenizer, with a DDIM scheduler built from the pipeline's scheduler config. SDXL needs the
extra conditioning (pooled text embeddings, time ids) and is not wired yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from promptserve.engine.denoise import Components
from promptserve.engine.tiny import DenoisingEngine
from promptserve.errors import InputError


class _Tokenizer:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def __call__(self, texts: Sequence[str]):
        return self._tok(
            list(texts),
            padding="max_length",
            max_length=self._tok.model_max_length,
            truncation=True,
            return_tensors="np",
        )


def load_diffusers(model: str, device: str = "cpu", dtype: str = "float32") -> Components:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch_dtype = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }.get(dtype)
    if torch_dtype is None:
        raise InputError(f"dtype {dtype!r} is not float32, float16 or bfloat16")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load diffusers model {model!r}: {exc}") from None
    pipe = pipe.to(device)
    size = pipe.unet.config.sample_size
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=_Tokenizer(pipe.tokenizer),
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        vae_scale=pipe.vae.config.scaling_factor,
        latent_shape=(pipe.unet.config.in_channels, size, size),
        device=device,
        dtype=torch_dtype,
    )


def diffusers_engine(
    model: str,
    device: str = "cpu",
    dtype: str = "float32",
    total_steps: int = 50,
    levels: Sequence[int] = (0, 5, 10, 15, 20, 25),
) -> DenoisingEngine:
    return DenoisingEngine(
        load_diffusers(model, device, dtype), f"diffusers:{model}", total_steps, levels
    )
