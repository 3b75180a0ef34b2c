"""A plain denoising loop over diffusers components, resumable at any step.

Why not the pipeline's ``__call__``: resuming at step K needs ``scheduler.timesteps[K:]`` from
the step-K latent, DDIM takes no ``timesteps=`` argument, and pipelines multiply passed
latents by ``init_noise_sigma``. A loop of our own is short and was bit-exact in a probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object  # callable like a transformers tokenizer: (texts) -> {"input_ids": ...}
    scheduler: object  # a diffusers scheduler (DDIM by default)
    vae_scale: float  # latents are divided by this before decoding
    latent_shape: tuple[int, int, int]  # channels, height, width
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # SDXL: a second text encoder and tokenizer (with projection); their pooled output and the
    # size/crop time ids condition the UNet as ``added_cond_kwargs``.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    image_size: int = 0


def encode(c: Components, prompts: Sequence[str]) -> tuple[torch.Tensor, dict | None]:
    """Text context for the UNet, and SDXL's extra conditioning (None for SD 1.x/2.x)."""
    ids = torch.as_tensor(np.asarray(c.tokenizer(list(prompts))["input_ids"]), device=c.device)
    with torch.no_grad():
        if c.text_encoder_2 is None:
            return c.text_encoder(ids)[0].to(c.dtype), None
        ids_2 = torch.as_tensor(
            np.asarray(c.tokenizer_2(list(prompts))["input_ids"]), device=c.device
        )
        first = c.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = c.text_encoder_2(ids_2, output_hidden_states=True)
    context = torch.cat([first, second.hidden_states[-2]], dim=-1).to(c.dtype)
    size = c.image_size
    time_ids = torch.tensor(
        [[size, size, 0, 0, size, size]] * len(prompts), device=c.device, dtype=c.dtype
    )
    return context, {"text_embeds": second.text_embeds.to(c.dtype), "time_ids": time_ids}


def initial_noise(c: Components, seed: int) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, *c.latent_shape), generator=gen, dtype=torch.float32)
    return (noise * c.scheduler.init_noise_sigma).to(c.device, c.dtype)


def denoise(
    c: Components,
    latents: torch.Tensor,
    prompts: Sequence[str],
    start_step: int,
    total_steps: int,
    capture: Sequence[int],
    guidance: float = 7.5,
    on_step=None,
    previews: Sequence[Sequence[int]] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run steps ``start_step .. total_steps - 1`` on a batch that shares its start step.

    Returns the final latents and, for each level in ``capture`` that the run passes, the
    latents after that many steps. ``previews[row]``: the steps after which that row's
    predicted clean image is decoded and passed to ``on_step(step, {row: png})``.
    """
    c.scheduler.set_timesteps(total_steps, device=c.device)
    cond, cond_extra = encode(c, prompts)
    uncond, uncond_extra = encode(c, [""] * len(prompts))
    context = torch.cat([uncond, cond])
    extra = None
    if cond_extra is not None and uncond_extra is not None:
        extra = {key: torch.cat([uncond_extra[key], cond_extra[key]]) for key in cond_extra}
    captured: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for step in range(start_step, total_steps):
            t = c.scheduler.timesteps[step]
            model_in = c.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = c.unet(
                model_in, t, encoder_hidden_states=context, added_cond_kwargs=extra
            ).sample
            uncond_noise, cond_noise = noise.chunk(2)
            guided = uncond_noise + guidance * (cond_noise - uncond_noise)
            out = c.scheduler.step(guided, t, latents)
            latents = out.prev_sample
            if step + 1 in capture:
                captured[step + 1] = latents.clone()
            if on_step is None:
                continue
            rows = [r for r, steps in enumerate(previews) if step + 1 in steps]
            if rows:
                x0 = getattr(out, "pred_original_sample", None)
                x0 = latents if x0 is None else x0
                on_step(step + 1, dict(zip(rows, decode_png(c, x0[rows]), strict=True)))
            else:
                on_step(step + 1)
    return latents, captured


def decode_png(c: Components, latents: torch.Tensor) -> list[bytes]:
    import io

    from PIL import Image

    with torch.no_grad():
        images = c.vae.decode(latents / c.vae_scale).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
