"""A dedicated inpainting model's mask channels (a 9-channel inpainting UNet, Flux Fill): what
goes into every denoiser call beside a member's latent, for an inpainting member its own, for
any other member the plain ones (every pixel painted). Apart from ``edits`` so that both
families' steppers read it without importing one another."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


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


def with_extras(c, rows: list, members: Sequence = ()) -> list:  # noqa: ANN001 - components, Rows, Blends
    """``rows`` with each member's extra input on a model with mask channels: an inpainting
    member's own, any other's the plain one (``maskchannels.plain_extra``); and an instruction
    edit's context tokens (``edits.ContextTokens``). Unchanged elsewhere."""
    members = list(members) + [None] * (len(rows) - len(members))
    # ``edits.conditioned``'s rule (imported there: edits imports this module)
    rows = [
        m.conditioned(r) if hasattr(m, "conditioned") else r
        for r, m in zip(rows, members, strict=True)
    ]
    if not getattr(c, "extra_channels", 0):
        return rows
    return [
        dataclasses.replace(
            r, extra=m.extra if m is not None and m.extra is not None else plain_extra(c, r.size)
        )
        for r, m in zip(rows, members, strict=True)
    ]
