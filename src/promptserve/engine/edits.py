"""Image-to-image: an edit is a request that starts at step about N (1 - s) (``start_step``)
from its own image (encoded by the model's VAE at the served size, noised to that step with
the request's seed), which is what a resumed request already is at K: the denoising loop runs
it unchanged, for every family.

The start latent is made as diffusers' ``*Img2ImgPipeline.prepare_latents`` makes it, drawing
from one generator seeded with the request's seed in the same order (the VAE's posterior
sample, then the noise), so a run equals the pipeline's at the same seed and strength.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from promptserve.engine.flow import sigma_schedule
from promptserve.errors import InputError


def start_step(total_steps: int, strength: float, family: str = "unet") -> int:
    """The step an edit at ``strength`` starts from, as the family's img2img pipeline counts
    it: the UNet pipelines run the last int(N s) steps; SD3's and Flux's start at
    int(N - N s), so they run one more where N s is not whole."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if family == "unet":
        return total_steps - min(int(total_steps * strength), total_steps)
    return int(max(total_steps - min(total_steps * strength, total_steps), 0))


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB image as the VAE takes it: (1, 3, H, W) in [-1, 1]."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2.0 - 1.0


def edit_start(
    c,  # noqa: ANN001 - a family's components
    image: Image.Image,
    strength: float,
    seed: int,
    total_steps: int,
) -> tuple[int, torch.Tensor]:
    """The step an edit starts at and its start latent (the family's unpacked shape)."""
    k = start_step(total_steps, strength, c.family)
    gen = torch.Generator("cpu").manual_seed(seed)
    pixels = pixels_of(image).to(c.device, c.dtype)
    with torch.no_grad():
        posterior = c.vae.encode(pixels).latent_dist
        if c.family == "unet":  # DDIM: the clean latent noised to the start step's timestep
            clean = posterior.sample(gen) * c.vae.config.scaling_factor
            noise = torch.randn(clean.shape, generator=gen, dtype=clean.dtype).to(c.device)
            c.scheduler.set_timesteps(total_steps)
            return k, c.scheduler.add_noise(clean, noise, c.scheduler.timesteps[k : k + 1])
        # flow matching (SD3, Flux): the straight line from the clean latent to the noise, at
        # the start step's sigma of the run's own schedule (Flux's shifted by the size)
        shift = c.vae.config.shift_factor or 0.0
        clean = (posterior.sample(gen) - shift) * c.vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=gen, dtype=clean.dtype).to(c.device)
        sigmas, _ = sigma_schedule(c, total_steps, tuple(clean.shape[2:]))
        sigma = sigmas[k].to(clean.dtype)
        return k, sigma * noise + (1.0 - sigma) * clean
