"""Image-to-image: an edit is a request that starts at step about N (1 - s) (``start_step``)
from its own image (encoded by the model's VAE at the served size, noised to that step with
the request's seed), which is what a resumed request already is at K: the denoising loop runs
it unchanged, for every family.

The start latent is made as diffusers' ``*Img2ImgPipeline.prepare_latents`` makes it, drawing
from one generator seeded with the request's seed in the same order (the VAE's posterior
sample, then the noise), so a run equals the pipeline's at the same seed and strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from promptserve.engine.base import EditInput
from promptserve.engine.flow import sigma_schedule
from promptserve.strength import start_step


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB image as the VAE takes it: (1, 3, H, W) in [-1, 1]."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_of(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Where the model paints, at the latent's size: (1, 1, h, w), 1 to paint and 0 to keep,
    as diffusers' mask processor makes it (grayscale, binarised at one half, then the
    nearest latent pixel). ``mask`` is white where the model paints (diffusers' convention;
    the API's transparent pixels are turned into white before)."""
    gray = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    full = torch.from_numpy(gray)[None, None]
    full = torch.where(full < 0.5, 0.0, 1.0)
    return torch.nn.functional.interpolate(full, size=latent_hw)


@dataclass
class Inpaint:
    """An inpainting member's input, carried through its run: after every step the kept
    region is set back to the input's latent noised to the step that follows (the blending
    of diffusers' inpaint pipelines for a model without inpainting channels)."""

    clean: torch.Tensor  # the input's latent, (1, C, h, w)
    noise: torch.Tensor  # the noise its start was drawn with
    mask: torch.Tensor  # (1, 1, h, w): 1 where the model paints
    total_steps: int
    scheduler: object  # DDIM's ``add_noise`` (UNet families)
    timesteps: torch.Tensor | None = None  # UNet families: the run's, as its start saw them
    sigmas: torch.Tensor | None = None  # flow families: the run's sigmas
    extra = None  # no mask channels: the blend does it

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """``latents`` (this member's row) after ``step`` steps, its kept region restored."""
        if self.sigmas is not None:
            sigma = self.sigmas[step].to(self.clean.dtype)
            kept = sigma * self.noise + (1.0 - sigma) * self.clean
        elif step < self.total_steps:
            at = self.timesteps[step : step + 1]  # type: ignore[index]
            kept = self.scheduler.add_noise(self.clean, self.noise, at)  # type: ignore[attr-defined]
        else:
            kept = self.clean
        return (1 - self.mask) * kept + self.mask * latents


@dataclass
class MaskChannels:
    """An inpainting member of a model with mask channels (a 9-channel inpainting UNet, Flux
    Fill): its mask and its masked image's latent go into every denoiser call beside its
    latent, as the model was trained, and nothing is blended."""

    extra: torch.Tensor  # (1, E, h, w), unpacked (``mask_channels``)

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        return latents


def paint_of(mask: Image.Image, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask at the image's own size, binarised as the pipelines' mask processor does:
    (1, 1, H, W), 1 where the model paints."""
    gray = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.where(torch.from_numpy(gray)[None, None] < 0.5, 0.0, 1.0).to(device, dtype)


def mask_channels(
    c,  # noqa: ANN001 - a family's components with mask channels
    pixels: torch.Tensor,
    paint: torch.Tensor,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """A model's extra input for ``pixels`` (1, 3, H, W) painted where ``paint`` is 1: the
    masked image (the kept pixels, the painted ones 0) through the VAE (a posterior sample
    from ``gen``, as the pipelines draw it; None: its mean), with the mask at the latent's
    size, channel-first for a UNet (``StableDiffusion*InpaintPipeline``); for Flux Fill the
    latent first, then the full-resolution mask as 64 channels of 8x8 patches
    (``FluxFillPipeline.prepare_mask_latents``, unpacked)."""
    with torch.no_grad():
        posterior = c.vae.encode(pixels * (paint < 0.5)).latent_dist
        sample = posterior.sample(gen) if gen is not None else posterior.mode()
    h, w = pixels.shape[2] // 8, pixels.shape[3] // 8
    scale = c.vae.config.scaling_factor
    if c.family == "unet":
        at_latent = torch.nn.functional.interpolate(paint, size=(h, w))
        return torch.cat([at_latent, sample * scale], dim=1)
    masked = (sample - (c.vae.config.shift_factor or 0.0)) * scale
    patches = paint[:, 0].view(1, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(1, 64, h, w)
    return torch.cat([masked, patches.to(masked.dtype)], dim=1)


def plain_extra(c, size: tuple[int, int]) -> torch.Tensor:  # noqa: ANN001
    """A generation's extra input on a model with mask channels: every pixel painted (the
    masked image all zeros, its latent the VAE's mean), as its pipeline with a white mask;
    made once per size."""
    if size not in c.plain_extras:
        width, height = size
        pixels = torch.zeros((1, 3, height, width), device=c.device, dtype=c.dtype)
        c.plain_extras[size] = mask_channels(c, pixels, torch.ones_like(pixels[:, :1]), None)
    return c.plain_extras[size]


def edit_start(
    c,  # noqa: ANN001 - a family's components
    image: Image.Image,
    strength: float,
    seed: int,
    total_steps: int,
    mask: Image.Image | None = None,
) -> tuple[int, torch.Tensor, Inpaint | MaskChannels | None]:
    """The step an edit starts at, its start latent (the family's unpacked shape) and, with a
    ``mask`` (white where the model paints), what its steps blend with (a model with mask
    channels: what goes beside its latent). At full strength an inpainting starts from the
    noise alone, as the inpaint pipelines do; a 9-channel UNet's draws no image latent then.
    """
    k = start_step(total_steps, strength, c.family)
    gen = torch.Generator("cpu").manual_seed(seed)
    pixels = pixels_of(image).to(c.device, c.dtype)
    channels = mask is not None and c.extra_channels > 0
    with torch.no_grad():
        posterior = c.vae.encode(pixels).latent_dist
        timesteps = sigmas = None
        if c.family == "unet":  # DDIM: the clean latent noised to the start step's timestep
            drawn = not (channels and k == 0)  # the pipeline encodes no image to start from
            clean = posterior.sample(gen) if drawn else posterior.mode()
            clean = clean * c.vae.config.scaling_factor
            c.scheduler.set_timesteps(total_steps)
            timesteps = c.scheduler.timesteps.clone()
        else:  # flow matching (SD3, Flux): the line from the clean latent to the noise
            shift = c.vae.config.shift_factor or 0.0
            clean = (posterior.sample(gen) - shift) * c.vae.config.scaling_factor
            sigmas, _ = sigma_schedule(c, total_steps, tuple(clean.shape[2:]))
        noise = torch.randn(clean.shape, generator=gen, dtype=clean.dtype).to(c.device)
        if sigmas is not None:  # at the start step's sigma of the run's own schedule
            sigma = sigmas[k].to(clean.dtype)
            start = sigma * noise + (1.0 - sigma) * clean
        elif mask is not None and k == 0:
            start = noise * c.scheduler.init_noise_sigma
        else:
            start = c.scheduler.add_noise(clean, noise, timesteps[k : k + 1])  # type: ignore[index]
    if mask is None:
        return k, start, None
    if channels:  # the masked image's latent drawn after the noise, as the pipelines do
        return (
            k,
            start,
            MaskChannels(mask_channels(c, pixels, paint_of(mask, c.device, c.dtype), gen)),
        )
    where = mask_of(mask, tuple(clean.shape[2:])).to(c.device, clean.dtype)
    return k, start, Inpaint(clean, noise, where, total_steps, c.scheduler, timesteps, sigmas)


def item_start(c, edit: EditInput, seed: int, total_steps: int):  # noqa: ANN001, ANN201
    """``edit_start`` for an item's ``EditInput`` (pixels, as a worker receives them): the
    step, the start latent and the inpainting blend, as both runners join an edit."""
    mask = Image.fromarray(edit.mask) if edit.mask is not None else None
    return edit_start(c, Image.fromarray(edit.image), edit.strength, seed, total_steps, mask)
