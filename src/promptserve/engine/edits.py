"""Image-to-image: an edit is a request that starts at step about N (1 - s) (``start_step``)
from its own image (encoded by the model's VAE at the served size, noised to that step with
the request's seed), which is what a resumed request already is at K: the denoising loop runs
it unchanged, for every family.

The start latent is made as diffusers' ``*Img2ImgPipeline.prepare_latents`` makes it, drawing
from one generator seeded with the request's seed in the same order (the VAE's posterior
sample, then the noise), so a run equals the pipeline's at the same seed and strength.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from promptserve.engine.base import GenerationItem
from promptserve.engine.flow import pack, sigma_schedule
from promptserve.engine.maskchannels import MaskChannels, mask_channels, paint_of
from promptserve.engine.rows import Row
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
class ContextTokens:
    """An instruction edit's image on Flux Kontext: its latent (the VAE's mean, shifted and
    scaled), packed into tokens whose position ids carry 1 in their first coordinate, attended
    beside the member's own tokens at every step; nothing is blended."""

    context: tuple[torch.Tensor, torch.Tensor]  # (1, T, 64) tokens and their (T, 3) ids
    extra = None

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        return latents

    def conditioned(self, row: Row) -> Row:
        return dataclasses.replace(row, context=self.context)


def conditioned(row: Row, member: object) -> Row:
    """``row`` as an edit member's conditioning changes it (an instruction edit's image tokens,
    and on Qwen-Image-Edit its prompt read with its images); unchanged for any other."""
    return member.conditioned(row) if hasattr(member, "conditioned") else row  # type: ignore[attr-defined]


def kontext_start(c, pixels: torch.Tensor, seed: int) -> tuple[int, torch.Tensor, ContextTokens]:  # noqa: ANN001
    """Kontext's start: step 0 from the seed's noise (the pipeline draws nothing before it:
    its image latent is the posterior's mode), the image a condition (``ContextTokens``)."""
    with torch.no_grad():
        mode = c.vae.encode(pixels).latent_dist.mode()
    clean = (mode - (c.vae.config.shift_factor or 0.0)) * c.vae.config.scaling_factor
    h, w = clean.shape[2] // 2, clean.shape[3] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = 1  # the latent's own ids with the first coordinate 1
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    context = (pack(clean), ids.reshape(h * w, 3).to(c.device, c.dtype))
    size = (pixels.shape[3], pixels.shape[2])
    return 0, c.noise(seed, size), ContextTokens(context)


def edit_start(
    c,  # noqa: ANN001 - a family's components
    image: Image.Image,
    strength: float,
    seed: int,
    total_steps: int,
    mask: Image.Image | None = None,
    prompt: str = "",
    negative: str | None = None,
    more: tuple[Image.Image, ...] = (),
) -> tuple[int, torch.Tensor, Inpaint | MaskChannels | ContextTokens | None]:
    """The step an edit starts at, its start latent (the family's unpacked shape) and, with a
    ``mask`` (white where the model paints), what its steps blend with (a model with mask
    channels: what goes beside its latent). At full strength an inpainting starts from the
    noise alone, as the inpaint pipelines do; a 9-channel UNet's draws no image latent then.
    An instruction edit starts at step 0, its image (and on Qwen-Image-Edit the ``more``
    images after it, read with the ``prompt`` and ``negative`` prompt) its conditioning.
    """
    if getattr(c, "reads_images", False):  # Qwen-Image-Edit
        size = (image.width, image.height)
        return c.instruction_start((image, *more), prompt, negative, seed, size)
    pixels = pixels_of(image).to(c.device, c.dtype)
    if getattr(c, "kontext", False):  # an instruction edit: the image conditions, from step 0
        return kontext_start(c, pixels, seed)
    k = start_step(total_steps, strength, c.family)
    gen = torch.Generator("cpu").manual_seed(seed)
    channels = mask is not None and c.extra_channels > 0
    with torch.no_grad():
        timesteps = sigmas = None
        if hasattr(c, "image_latent"):  # a family with its own VAE's normalisation (Qwen-Image)
            clean = c.image_latent(pixels, gen)
            sigmas, _ = sigma_schedule(c, total_steps, tuple(clean.shape[2:]))
        elif c.family == "unet":  # DDIM: the clean latent noised to the start step's timestep
            posterior = c.vae.encode(pixels).latent_dist
            drawn = not (channels and k == 0)  # the pipeline encodes no image to start from
            clean = posterior.sample(gen) if drawn else posterior.mode()
            clean = clean * c.vae.config.scaling_factor
            c.scheduler.set_timesteps(total_steps)
            timesteps = c.scheduler.timesteps.clone()
        else:  # flow matching (SD3, Flux, Z-Image): the line from the clean latent to the noise
            posterior = c.vae.encode(pixels).latent_dist
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


def item_start(c, item: GenerationItem, total_steps: int):  # noqa: ANN001, ANN201
    """``edit_start`` for an edit item (its ``EditInput`` pixels, as a worker receives them):
    the step, the start latent and the member's blend or conditioning, as both runners join
    an edit."""
    edit = item.edit
    assert edit is not None
    mask = Image.fromarray(edit.mask) if edit.mask is not None else None
    more = tuple(Image.fromarray(image) for image in edit.more)
    return edit_start(
        c, Image.fromarray(edit.image), edit.strength, item.seed, total_steps, mask,
        item.prompt, item.look.negative_prompt, more,
    )  # fmt: skip
