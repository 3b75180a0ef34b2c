"""Step-level execution: one running batch on one model, members at different steps.

A denoiser call takes a timestep per sample, and the DDIM update is arithmetic per sample, so
one call advances every member by one step wherever each one is. A member joins between two
steps (from noise at K = 0, or from its cached neighbour's latent at its own K), has its
latents captured at the cache levels as it passes them, and leaves after its last step,
decoded. Cancelling a member frees its slot at the next step.

Text encoding happens once per member at join (batched over the members joining together),
and the empty prompt's encoding once per runner; VAE decoding is batched over the members
leaving together. Only DDIM is supported (the scheduler of every engine here); its update is
written out below, as ``DDIMScheduler.step`` with eta = 0 and epsilon prediction computes it
for one shared timestep.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from promptserve.engine.base import GenerationItem, GenerationResult
from promptserve.engine.denoise import Components, decode_png, encode, initial_noise


@dataclass
class _Slot:
    key: Hashable
    item: GenerationItem
    latent: torch.Tensor  # (1, C, H, W)
    cond: torch.Tensor  # (1, tokens, dim)
    extra: dict | None  # SDXL's pooled text embeds and time ids, (1, ...) each
    step: int  # steps done
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class StepRunner:
    def __init__(
        self,
        components: Components,
        total_steps: int,
        levels: Sequence[int],
        guidance: float = 7.5,
        placeholder: bool = False,
    ) -> None:
        scheduler = components.scheduler
        if type(scheduler).__name__ != "DDIMScheduler":
            raise ValueError(
                f"step-level serving needs a DDIM scheduler, not {type(scheduler).__name__}"
            )
        config = scheduler.config
        if config.prediction_type != "epsilon" or config.clip_sample or config.thresholding:
            raise ValueError("step-level serving supports DDIM with epsilon prediction only")
        self.c, self.total_steps, self.levels = components, total_steps, tuple(levels)
        self.guidance, self.placeholder = guidance, placeholder
        scheduler.set_timesteps(total_steps, device=components.device)
        self.timesteps = scheduler.timesteps.clone()
        self.stride = config.num_train_timesteps // total_steps
        self.alphas = scheduler.alphas_cumprod.to(components.device, torch.float32)
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        self.uncond, self.uncond_extra = encode(components, [""])
        self.slots: list[_Slot] = []
        self.previews: dict[Hashable, bytes] = {}  # the last step's, per member that asked

    def __len__(self) -> int:
        return len(self.slots)

    def steps_left(self) -> dict[Hashable, int]:
        return {s.key: self.total_steps - s.step for s in self.slots}

    def join(self, members: Sequence[tuple[Hashable, GenerationItem]]) -> None:
        """Add members before the next step; each starts at its item's K."""
        if not members:
            return
        for _, item in members:
            if item.k not in self.levels:
                raise ValueError(f"level K={item.k} is not one of {self.levels}")
            if item.k > 0 and item.start_latent is None:
                raise ValueError(f"level K={item.k} needs a start latent")
        cond, extra = encode(self.c, [item.prompt for _, item in members])
        for j, (key, item) in enumerate(members):
            if item.k == 0:
                latent = initial_noise(self.c, item.seed)
            else:
                latent = torch.as_tensor(
                    item.start_latent, dtype=self.c.dtype, device=self.c.device
                )[None]
            row = {name: value[j : j + 1] for name, value in extra.items()} if extra else None
            self.slots.append(_Slot(key, item, latent, cond[j : j + 1], row, item.k))

    def cancel(self, key: Hashable) -> bool:
        """Take a member out; its slot is free for the next step."""
        before = len(self.slots)
        self.slots = [s for s in self.slots if s.key != key]
        return len(self.slots) < before

    def step(self) -> list[tuple[Hashable, GenerationResult]]:
        """Advance every member one step; the members that finished, decoded (and in
        ``previews``, the members that asked for a preview at this step)."""
        self.previews = {}
        if not self.slots:
            return []
        n = len(self.slots)
        latents = torch.cat([s.latent for s in self.slots])
        t = torch.stack([self.timesteps[s.step] for s in self.slots])
        context = torch.cat([self.uncond.expand(n, -1, -1), *[s.cond for s in self.slots]])
        extra = None
        if self.uncond_extra is not None:
            extra = {
                name: torch.cat(
                    [self.uncond_extra[name].expand(n, -1), *[s.extra[name] for s in self.slots]]
                )
                for name in self.uncond_extra
            }
        with torch.no_grad():
            noise = self.c.unet(
                torch.cat([latents, latents]),
                torch.cat([t, t]),
                encoder_hidden_states=context,
                added_cond_kwargs=extra,
            ).sample
            uncond, cond = noise.chunk(2)
            guided = uncond + self.guidance * (cond - uncond)
            latents, x0 = self._ddim(latents, guided, t)
        rows = [j for j, s in enumerate(self.slots) if s.step + 1 in s.item.previews]
        pngs = decode_png(self.c, x0[rows]) if rows else []
        self.previews = {self.slots[j].key: png for j, png in zip(rows, pngs, strict=True)}
        done: list[_Slot] = []
        for j, slot in enumerate(self.slots):
            slot.latent = latents[j : j + 1]
            slot.step += 1
            if slot.step in self.levels and slot.step > slot.item.k:
                slot.captured[slot.step] = slot.latent.clone()
            if slot.step >= self.total_steps:
                done.append(slot)
        if not done:
            return []
        self.slots = [s for s in self.slots if s.step < self.total_steps]
        finals = torch.cat([s.latent for s in done])
        pngs = decode_png(self.c, finals)
        return [
            (
                s.key,
                GenerationResult(
                    png=png,
                    k=s.item.k,
                    latents={lv: lat[0].float().cpu().numpy() for lv, lat in s.captured.items()},
                    final_latent=s.latent[0].float().cpu().numpy(),
                    placeholder=self.placeholder,
                ),
            )
            for s, png in zip(done, pngs, strict=True)
        ]

    def _ddim(
        self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step per sample, each from its own timestep; the next
        latents and the predicted clean latents (what a preview shows)."""
        prev = t - self.stride
        a_t = self.alphas[t]
        a_prev = torch.where(
            prev >= 0, self.alphas[prev.clamp(min=0)], torch.tensor(self.final_alpha)
        )
        shape = (-1,) + (1,) * (x.dim() - 1)
        a_t, a_prev = a_t.view(shape).to(x.dtype), a_prev.view(shape).to(x.dtype)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0
