"""Real Stable Diffusion weights (1.x/2.x and SDXL) through diffusers, run by the same
resumable loop.

Loads a local pipeline folder with ``DiffusionPipeline`` and keeps
its UNet, VAE, text encoder(s) and tokenizer(s), with a DDIM scheduler built from the pipeline's
scheduler config. An SDXL pipeline brings a second text encoder; the loop then passes the pooled
embeddings and size time ids the SDXL UNet expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    from diffusers import DDIMScheduler, DiffusionPipeline

    torch_dtype = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }.get(dtype)
    if torch_dtype is None:
        raise InputError(f"dtype {dtype!r} is not float32, float16 or bfloat16")
    if not Path(model).expanduser().is_dir():
        # nothing is downloaded (these machines reach no hub): a model is a local folder
        raise InputError(
            f"model folder {model!r} not found (give a local diffusers folder with "
            "model_index.json: nothing is downloaded)"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load diffusers model {model!r}: {exc}") from None
    if not all(hasattr(pipe, part) for part in ("unet", "vae", "text_encoder", "tokenizer")):
        raise InputError(
            f"{model!r} is not a Stable Diffusion pipeline (UNet, VAE, CLIP text encoder)"
        )
    pipe = pipe.to(device)
    size = pipe.unet.config.sample_size
    second = getattr(pipe, "text_encoder_2", None)
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
        text_encoder_2=second,
        tokenizer_2=_Tokenizer(pipe.tokenizer_2) if second is not None else None,
        image_size=size * 2 ** (len(pipe.vae.config.block_out_channels) - 1),
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
