"""A plain denoising loop over diffusers components, resumable at any step, and the UNet
family (SD 1.x/2.x, SDXL) with its DDIM update.

Why not the pipeline's ``__call__``: resuming at step K needs ``scheduler.timesteps[K:]`` from
the step-K latent, DDIM takes no ``timesteps=`` argument, and pipelines multiply passed
latents by ``init_noise_sigma``. A loop of our own is short, and it equals the pipeline's
output (``tests/test_flow.py``). Every family runs the same loop (``denoise``): a batch that
shares its start step is advanced by the family's per-sample stepper, the one the step runner
uses, so batch, solo and step-level runs are one code path. The DDIM update reads its
coefficients from per-step tables on the device: no host sync inside the loop (diffusers'
``DDIMScheduler.step`` compares a device tensor on the host at every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from promptserve.engine.adapterbank import AdapterBank, adapters_on, refresh_on_join
from promptserve.engine.base import UNET_GUIDANCE, Guidance, Look
from promptserve.engine.featurecache import batch_rows, is_full_step, member_rows, unet_forward
from promptserve.engine.maskchannels import with_extras
from promptserve.engine.rows import Row, rows_of, scales_of


class Blend(Protocol):
    """A member's per-step blend (an inpainting one's kept region: ``edits.Inpaint``), or
    for a model with mask channels its ``extra`` input and no blend (``maskchannels.MaskChannels``)."""

    extra: torch.Tensor | None

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor: ...


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
    lora_bank: AdapterBank | None = None  # the adapters in the UNet (``engine.adapterbank``)
    text_lora: dict[str, AdapterBank] = field(default_factory=dict)  # per text encoder
    adapter_names: tuple[str, ...] = ()  # every adapter loaded (``engine.lora``)
    plain_extras: dict = field(default_factory=dict)  # per size (``maskchannels.plain_extra``)
    stepper_type: type | None = None  # None: DDIM (the default update of the UNet loop)
    family = "unet"

    @property
    def extra_channels(self) -> int:
        """Input channels beside the latent's: 5 for an inpainting UNet (mask, masked image)."""
        return self.unet.config.in_channels - self.latent_shape[0]

    # -- the family interface the engine and the step runner call (``flow.FlowComponents``
    # -- is the other family): noise, decode, and a per-sample stepper (``denoise`` runs it)
    def noise(self, seed: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        return initial_noise(self, seed, size)

    @property
    def native(self) -> tuple[int, int]:
        """Its own (width, height): the latent's times the VAE's 8."""
        return self.latent_shape[2] * 8, self.latent_shape[1] * 8

    @property
    def multiple(self) -> int:
        """What a size's sides must divide by: the VAE's 8, halved again per UNet down block."""
        return 8 * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def sizes_family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    def decode(self, latents: torch.Tensor) -> list[bytes]:
        return decode_png(self, latents)

    @property
    def guidance_spec(self) -> Guidance:
        return UNET_GUIDANCE

    def stepper(self, total_steps: int, guidance: float) -> DDIMStepper:
        """DDIM, unless the folder's scheduler asks for another update (``stepper_type``:
        ``euler.EulerStepper`` for a few-step distillation's trailing Euler)."""
        return (self.stepper_type or DDIMStepper)(self, total_steps, guidance)


def encode(
    c: Components, prompts: Sequence[str], loras: Sequence[tuple] | None = None
) -> tuple[torch.Tensor, dict | None]:
    """Text context for the UNet, and SDXL's pooled embeds (None for SD 1.x/2.x); SDXL's
    size ids are a member's size's (``time_ids``). ``loras[i]``: prompt i's adapters, for
    those with text-encoder weights."""
    ids = torch.as_tensor(np.asarray(c.tokenizer(list(prompts))["input_ids"]), device=c.device)
    with torch.no_grad(), ExitStack() as stack:
        for bank in c.text_lora.values():
            stack.enter_context(adapters_on(bank, loras or [()] * len(prompts), c.device))
        if c.text_encoder_2 is None:
            return c.text_encoder(ids)[0].to(c.dtype), None
        ids_2 = torch.as_tensor(
            np.asarray(c.tokenizer_2(list(prompts))["input_ids"]), device=c.device
        )
        first = c.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = c.text_encoder_2(ids_2, output_hidden_states=True)
    context = torch.cat([first, second.hidden_states[-2]], dim=-1).to(c.dtype)
    return context, {"text_embeds": second.text_embeds.to(c.dtype)}


def time_ids(sizes: Sequence[tuple[int, int]], device: str, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size conditioning per row: original size, crop (0, 0), target size, each as
    (height, width), as its pipeline passes them for an uncropped image of that size."""
    rows = [[h, w, 0, 0, h, w] for w, h in sizes]
    return torch.tensor(rows, device=device, dtype=dtype)


def latent_shape(c, size: tuple[int, int] | None) -> tuple[int, int, int]:  # noqa: ANN001
    """The latent of an image of ``size`` (width, height): the VAE scales by 8."""
    if size is None:
        return tuple(c.latent_shape)
    return c.latent_shape[0], size[1] // 8, size[0] // 8


def initial_noise(c: Components, seed: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, *latent_shape(c, size)), generator=gen, dtype=torch.float32)
    return (noise * c.scheduler.init_noise_sigma).to(c.device, c.dtype)


def denoise(
    c,  # noqa: ANN001 - a family's components (Components, flow.FlowComponents)
    latents: torch.Tensor,
    prompts: Sequence[str],
    start_step: int,
    total_steps: int,
    capture: Sequence[int],
    guidance: float = 7.5,
    on_step=None,
    previews: Sequence[Sequence[int]] = (),
    looks: Sequence[Look] | None = None,
    interval: int = 1,
    inpaint: Sequence[Blend | None] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run steps ``start_step .. total_steps - 1`` on a batch that shares its start step.

    Returns the final latents and, for each level in ``capture`` that the run passes, the
    latents after that many steps. ``previews[row]``: the steps after which that row's
    predicted clean image is decoded and passed to ``on_step(step, {row: png})``.
    ``looks[row]``: its negative prompt and guidance scale (default: ``guidance``).
    ``interval`` > 1: DeepCache, a full step every ``interval`` steps (UNet families).
    ``inpaint[row]``: an inpainting member's input, blended in after every step.
    """
    stepper = c.stepper(total_steps, guidance)
    rows = with_extras(c, stepper.encode(prompts, looks), inpaint)  # one size: its latents
    captured: dict[int, torch.Tensor] = {}
    steps = torch.full((latents.shape[0],), start_step, device=latents.device, dtype=torch.long)
    deep = None
    for step in range(start_step, total_steps):
        if interval > 1:
            full = is_full_step(step - start_step, interval)
            latents, x0, deep = stepper.advance_features(
                latents, steps, rows, None if full else deep
            )
        else:
            latents, x0 = stepper.advance(latents, steps, rows)
        steps += 1
        for row, member in enumerate(inpaint):
            if member is not None:
                latents[row : row + 1] = member.blend(latents[row : row + 1], step + 1)
        if step + 1 in capture:
            captured[step + 1] = latents.clone()
        if on_step is None:
            continue
        wanted = [r for r, s in enumerate(previews) if step + 1 in s]
        if wanted:
            on_step(step + 1, dict(zip(wanted, c.decode(x0[wanted]), strict=True)))
        else:
            on_step(step + 1)
    return latents, captured


def decode_png(c: Components, latents: torch.Tensor) -> list[bytes]:
    def call(part: torch.Tensor) -> list[bytes]:
        with torch.no_grad():
            return png_bytes(c.vae.decode(part / c.vae_scale).sample)

    return in_chunks(call, latents)


DECODE_LATENT_PIXELS = 2 * 128 * 128  # one VAE call decodes at most two 1024² images' latents


def in_chunks(decode: Callable[[torch.Tensor], list[bytes]], latents: torch.Tensor) -> list[bytes]:
    """``decode`` over ``latents`` a few at a time: a VAE's memory grows with the pixels it
    decodes at once, and ten finishers of the largest size in one call can exhaust a GPU that
    runs their steps with room to spare."""
    per = max(1, DECODE_LATENT_PIXELS // (latents.shape[-2] * latents.shape[-1]))
    return [png for i in range(0, len(latents), per) for png in decode(latents[i : i + per])]


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
    """One deterministic DDIM step per sample, each from its own timestep (eta = 0: what
    ``DDIMScheduler.step`` computes for one shared timestep), epsilon or v prediction, with
    classifier-free guidance per member, against its negative prompt (by default the empty
    prompt, encoded once) at its own scale."""

    scheduler_name = "DDIMScheduler"  # the diffusers scheduler whose update this is

    def __init__(self, c: Components, total_steps: int, guidance: float) -> None:
        scheduler = c.scheduler
        name = type(scheduler).__name__
        if name != self.scheduler_name:
            raise ValueError(f"this UNet loop needs a {self.scheduler_name}, not {name}")
        config = scheduler.config
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name} with {config.prediction_type} prediction is not supported")
        if config.get("clip_sample") or config.get("thresholding"):
            raise ValueError(f"{name} with clip_sample or thresholding is not supported")
        self.c, self.guidance = c, guidance
        self.v_prediction = config.prediction_type == "v_prediction"
        self._schedule(scheduler, total_steps)
        (self.uncond,) = self._conditioning([""])

    def _schedule(self, scheduler, total_steps: int) -> None:  # noqa: ANN001 - a DDIMScheduler
        c, config = self.c, scheduler.config
        scheduler.set_timesteps(total_steps)
        timesteps = scheduler.timesteps.cpu()
        alphas = scheduler.alphas_cumprod.cpu().to(torch.float32)
        prev = timesteps - config.num_train_timesteps // total_steps
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).cpu()
        # per step index: the timestep, and the cumulative alphas at it and at the next one
        self.timesteps = timesteps.to(c.device)
        self.a_t = alphas[timesteps].to(c.device)
        self.a_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final).to(c.device)

    def _model_input(self, latents: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return latents  # DDIM scales nothing (``scale_model_input`` is the identity)

    def _update(
        self, latents: torch.Tensor, guided: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next latents and the predicted clean ones, from the guided prediction."""
        shape = (-1,) + (1,) * (latents.dim() - 1)
        dtype = latents.dtype
        a_t = self.a_t[steps].view(shape).to(dtype)
        a_prev = self.a_prev[steps].view(shape).to(dtype)
        if self.v_prediction:
            x0 = a_t.sqrt() * latents - (1 - a_t).sqrt() * guided
            eps = a_t.sqrt() * guided + (1 - a_t).sqrt() * latents
        else:
            eps = guided
            x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0

    def encode(self, prompts: Sequence[str], looks: Sequence[Look] | None = None) -> list[Row]:
        """Each prompt's conditioning: the text context and (SDXL) pooled embeds, time ids, for
        its prompt and its negative prompt. They join: a private bank loads their adapters."""
        refresh_on_join([self.c.lora_bank, *self.c.text_lora.values()], looks)
        rows = rows_of(
            self._conditioning, prompts, looks, self.guidance, self.uncond, self.c.native,
            self._text_loras,
        )  # fmt: skip
        return with_extras(self.c, rows)  # a model with mask channels: the plain ones

    def _text_loras(self, look: Look) -> tuple:
        banks = self.c.text_lora.values()
        return tuple(a for a in look.lora if any(b.carries(a[0]) for b in banks))

    def _conditioning(
        self, prompts: Sequence[str], loras: Sequence[tuple] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        context, extra = encode(self.c, prompts, loras)
        rows = []
        for j in range(len(prompts)):
            row = {"context": context[j : j + 1]}
            row.update({name: value[j : j + 1] for name, value in (extra or {}).items()})
            rows.append(row)
        return rows

    def advance(
        self, latents: torch.Tensor, steps: torch.Tensor, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next latents of every row (row j at step ``steps[j]``) and the predicted clean
        latents (what a preview shows). The rows share one latent shape (one size)."""
        latents, x0, _ = self._step(latents, steps, rows, None, plain=True)
        return latents, x0

    def advance_features(
        self,
        latents: torch.Tensor,
        steps: torch.Tensor,
        rows: Sequence[Row],
        deep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``advance`` with DeepCache (``engine.featurecache``): ``deep`` None, a full step that
        also returns its deep feature (rows 0..n-1 the negative passes, n..2n-1 the texts');
        given, a cached step on it."""
        return self._step(latents, steps, rows, deep, plain=False)

    @staticmethod
    def member_features(deep: torch.Tensor, n: int) -> list:
        """Each member's share of a full step's deep feature (its negative and text rows)."""
        return member_rows(deep, n, doubled=True)

    @staticmethod
    def batch_features(members: list) -> torch.Tensor:
        return batch_rows(members, doubled=True)

    def _step(self, latents, steps, rows, deep, plain):  # noqa: ANN001, ANN202
        both = {
            name: torch.cat([r.uncond[name] for r in rows] + [r.text[name] for r in rows])
            for name in self.uncond
        }
        context = both.pop("context")
        x = self._model_input(latents, steps)
        if rows[0].extra is not None:  # a model with mask channels: each member's beside it
            x = torch.cat([x, torch.cat([r.extra for r in rows])], dim=1)
        if both:  # SDXL: each row's size, for its negative and its text pass alike
            ids = time_ids([r.size for r in rows], latents.device, context.dtype)
            both["time_ids"] = torch.cat([ids, ids])
        t = self.timesteps[steps]
        loras = [r.lora for r in rows] * 2  # each member's negative pass carries its adapters
        with torch.no_grad(), adapters_on(self.c.lora_bank, loras, latents.device):
            if plain:  # the UNet's own forward: what every run without feature caching is
                out = self.c.unet(
                    torch.cat([x, x]),
                    torch.cat([t, t]),
                    encoder_hidden_states=context,
                    added_cond_kwargs=both or None,
                ).sample
            else:
                out, deep = unet_forward(
                    self.c.unet, torch.cat([x, x]), torch.cat([t, t]), context,
                    both or None, deep,
                )  # fmt: skip
            uncond, cond = out.chunk(2)
            guided = uncond + scales_of(rows, uncond) * (cond - uncond)
            return (*self._update(latents, guided, steps), deep)
