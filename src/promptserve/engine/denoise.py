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
    family = "unet"

    # -- the family interface the engine and the step runner call (``flow.FlowComponents``
    # -- is the other family): noise, a shared-start run, decode, and a per-sample stepper
    def noise(self, seed: int) -> torch.Tensor:
        return initial_noise(self, seed)

    def run(self, *args, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return denoise(self, *args, **kwargs)

    def decode(self, latents: torch.Tensor) -> list[bytes]:
        return decode_png(self, latents)

    def stepper(self, total_steps: int, guidance: float) -> DDIMStepper:
        return DDIMStepper(self, total_steps, guidance)


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
    with torch.no_grad():
        return png_bytes(c.vae.decode(latents / c.vae_scale).sample)


def png_bytes(images: torch.Tensor) -> list[bytes]:
    """PNG files of a batch of decoded images in [-1, 1]."""
    import io

    from PIL import Image

    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class DDIMStepper:
    """One deterministic DDIM step per sample, each from its own timestep (eta = 0, epsilon
    prediction: what ``DDIMScheduler.step`` computes for one shared timestep), with
    classifier-free guidance against the empty prompt, encoded once."""

    def __init__(self, c: Components, total_steps: int, guidance: float) -> None:
        scheduler = c.scheduler
        if type(scheduler).__name__ != "DDIMScheduler":
            raise ValueError(
                f"step-level serving needs a DDIM scheduler, not {type(scheduler).__name__}"
            )
        config = scheduler.config
        if config.prediction_type != "epsilon" or config.clip_sample or config.thresholding:
            raise ValueError("step-level serving supports DDIM with epsilon prediction only")
        self.c, self.guidance = c, guidance
        scheduler.set_timesteps(total_steps, device=c.device)
        self.timesteps = scheduler.timesteps.clone()
        self.stride = config.num_train_timesteps // total_steps
        self.alphas = scheduler.alphas_cumprod.to(c.device, torch.float32)
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        (self.uncond,) = self.encode([""])

    def encode(self, prompts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Each prompt's conditioning rows: the text context and (SDXL) pooled embeds, time ids."""
        context, extra = encode(self.c, prompts)
        rows = []
        for j in range(len(prompts)):
            row = {"context": context[j : j + 1]}
            row.update({name: value[j : j + 1] for name, value in (extra or {}).items()})
            rows.append(row)
        return rows

    def advance(
        self, latents: torch.Tensor, steps: torch.Tensor, rows: Sequence[dict]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next latents of every row (row j at step ``steps[j]``) and the predicted clean
        latents (what a preview shows)."""
        n = latents.shape[0]
        both = {
            name: torch.cat(
                [self.uncond[name].expand(n, *self.uncond[name].shape[1:])]
                + [r[name] for r in rows]
            )
            for name in self.uncond
        }
        context = both.pop("context")
        t = self.timesteps[steps]
        with torch.no_grad():
            noise = self.c.unet(
                torch.cat([latents, latents]),
                torch.cat([t, t]),
                encoder_hidden_states=context,
                added_cond_kwargs=both or None,
            ).sample
            uncond, cond = noise.chunk(2)
            return self._ddim(latents, uncond + self.guidance * (cond - uncond), t)

    def _ddim(
        self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prev = t - self.stride
        a_t = self.alphas[t]
        a_prev = torch.where(
            prev >= 0, self.alphas[prev.clamp(min=0)], torch.tensor(self.final_alpha)
        )
        shape = (-1,) + (1,) * (x.dim() - 1)
        a_t, a_prev = a_t.view(shape).to(x.dtype), a_prev.view(shape).to(x.dtype)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0
