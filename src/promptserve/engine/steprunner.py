"""Step-level execution: one running batch on one model, members at different steps.

A denoiser call takes a timestep per sample, and the scheduler update (DDIM for the UNet
family, Euler on the velocity for the flow-matching transformers) is arithmetic per sample, so
one call advances every member by one step wherever each one is. A member joins between two
steps (from noise at K = 0, or from its cached neighbour's latent at its own K), has its
latents captured at the cache levels as it passes them, and leaves after its last step,
decoded. Cancelling a member frees its slot at the next step.

Text encoding happens once per member at join (batched over the members joining together,
its negative prompt with it), and the empty prompt's encoding once per runner; each member
keeps its own guidance scale; VAE decoding is batched over the members
leaving together. The family's ``stepper`` owns the model call and the update
(``denoise.DDIMStepper``, ``flow.FlowStepper``); this runner owns membership.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from promptserve.engine.base import GenerationItem, GenerationResult, Paused
from promptserve.engine.edits import Inpaint, MaskChannels, conditioned, item_start
from promptserve.engine.rows import Row, context_key


@dataclass
class _Slot:
    key: Hashable
    item: GenerationItem
    latent: torch.Tensor  # (1, C, H, W)
    cond: Row  # the family's conditioning, (1, ...) each
    step: int  # steps done
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    deep: object = None  # feature caching: its share of its last full step's feature
    last_full: int = -1  # the step its last full step ran at
    inpaint: Inpaint | MaskChannels | None = None  # an inpainting member (blended per step)


class StepRunner:
    def __init__(
        self,
        components,  # noqa: ANN001 - a family's components (denoise.Components, flow.FlowComponents)
        total_steps: int,
        levels: Sequence[int],
        guidance: float = 7.5,
        placeholder: bool = False,
    ) -> None:
        self.c, self.total_steps, self.levels = components, total_steps, tuple(levels)
        self.guidance, self.placeholder = guidance, placeholder
        self.kernel = components.stepper(total_steps, guidance)
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
            if item.edit is not None or item.resume is not None:
                continue  # its start follows from its strength or its pause
            if item.k not in self.levels:
                raise ValueError(f"level K={item.k} is not one of {self.levels}")
            if item.k > 0 and item.start_latent is None:
                raise ValueError(f"level K={item.k} needs a start latent")
            if item.interval < 1:
                raise ValueError(f"feature-cache interval {item.interval} is not >= 1")
        rows = self.kernel.encode(
            [item.prompt for _, item in members], [item.look for _, item in members]
        )
        for (key, item), row in zip(members, rows, strict=True):
            if item.edit is not None:  # an edit's blend and images, made as at its first join
                slot = self._edit_slot(key, item, row)
            elif item.resume is not None:  # its latent is the pause's (``_resume``)
                slot = _Slot(key, item, torch.empty(0), row, item.k)
            else:
                slot = self._slot(key, item, row)
            if item.resume is not None:
                self._resume(slot, item.resume)
            self.slots.append(slot)

    def _slot(self, key: Hashable, item: GenerationItem, row: Row) -> _Slot:
        """A generation's member: from its seed's noise at K = 0, else its start latent."""
        if item.k == 0:
            latent = self.c.noise(item.seed, item.look.size)
        else:
            latent = torch.as_tensor(item.start_latent, dtype=self.c.dtype, device=self.c.device)
            latent = latent[None]
        return _Slot(key, item, latent, row, item.k)

    def _resume(self, slot: _Slot, paused: Paused) -> None:
        """``slot`` goes on from where it was written down (its conditioning, an edit's blend,
        made as at its first join)."""
        if str(self.c.dtype) != paused.dtype:
            raise ValueError(f"a member paused in {paused.dtype} cannot resume in {self.c.dtype}")
        if not 0 <= paused.step < self.total_steps:
            raise ValueError(f"a member paused at step {paused.step} of {self.total_steps}")
        to = {"dtype": self.c.dtype, "device": self.c.device}
        slot.latent = torch.as_tensor(paused.latent, **to)[None]
        slot.step = paused.step
        slot.captured = {lv: torch.as_tensor(a, **to)[None] for lv, a in paused.captured.items()}

    def _edit_slot(self, key: Hashable, item: GenerationItem, row: Row) -> _Slot:
        """An edit's member: its start step and latent from its own image and seed."""
        assert item.edit is not None
        k, latent, inpaint = item_start(self.c, item, self.total_steps)
        if inpaint is not None and inpaint.extra is not None:  # its mask channels, its own
            row = dataclasses.replace(row, extra=inpaint.extra)
        row = conditioned(row, inpaint)  # an instruction edit's images
        return _Slot(key, dataclasses.replace(item, k=k), latent, row, k, inpaint=inpaint)

    def _calls(self) -> list[list[_Slot]]:
        """The members grouped into denoiser calls, in join order within each: by latent shape,
        the members on a cached step (feature caching) apart from those on a full one, and
        instruction edits by their images' tokens (``rows.context_key``)."""
        groups: dict[tuple, list[_Slot]] = {}
        for slot in self.slots:
            cached = not self._full(slot)
            key = (tuple(slot.latent.shape), cached, context_key(slot.cond.context))
            groups.setdefault(key, []).append(slot)
        return list(groups.values())

    @staticmethod
    def _full(slot: _Slot) -> bool:
        """A full step every ``interval`` from the member's last: from its join at a constant
        interval, ``is_full_step``'s; after a re-interval, the new interval from the last."""
        return slot.deep is None or slot.step - slot.last_full >= slot.item.interval

    def reinterval(self, key: Hashable, interval: int) -> bool:
        """A running member's feature-cache interval from its next step (a burst: the
        scheduler only raises it); a member at r = 1 before runs a full step first."""
        if interval < 1:
            raise ValueError(f"feature-cache interval {interval} is not >= 1")
        for slot in self.slots:
            if slot.key == key:
                slot.item = dataclasses.replace(slot.item, interval=interval)
                return True
        return False

    def _advance_features(self, group, latents, steps, rows):  # noqa: ANN001, ANN202
        """One call of members that all run a full step (keeping their deep features) or all
        a cached one (on them): a member's two rows are its negative and its text pass."""
        deep = None
        if not self._full(group[0]):
            deep = self.kernel.batch_features([s.deep for s in group])
        latents, x0, out = self.kernel.advance_features(latents, steps, rows, deep)
        if deep is None:  # a full step: each member on an interval keeps its share
            for slot, mine in zip(group, self.kernel.member_features(out, len(group)), strict=True):
                if slot.item.interval > 1:
                    slot.deep, slot.last_full = mine, slot.step
        return latents, x0

    def snapshot(self, key: Hashable) -> Paused | None:
        """A member written down where it stands (None: not here); ``join`` with the item's
        ``resume`` set to it goes on exactly from there. A member on a feature-cache interval
        resumes with a full step (its deep features are not kept)."""
        for slot in self.slots:
            if slot.key == key:
                captured = {lv: _array(lat[0]) for lv, lat in slot.captured.items()}
                return Paused(slot.step, _array(slot.latent[0]), str(self.c.dtype), captured)
        return None

    def pause(self, key: Hashable) -> Paused | None:
        """A member written down and taken out (None: not here)."""
        state = self.snapshot(key)
        if state is not None:
            self.cancel(key)
        return state

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
        for group in self._calls():  # one denoiser call per size (and feature-cache phase)
            latents = torch.cat([s.latent for s in group])
            steps = torch.tensor([s.step for s in group], device=latents.device)
            rows_in = [s.cond for s in group]
            if all(s.item.interval <= 1 for s in group):
                latents, x0 = self.kernel.advance(latents, steps, rows_in)
            else:
                latents, x0 = self._advance_features(group, latents, steps, rows_in)
            rows = [j for j, s in enumerate(group) if s.step + 1 in s.item.previews]
            pngs = self.c.decode(x0[rows]) if rows else []
            self.previews.update({group[j].key: png for j, png in zip(rows, pngs, strict=True)})
            for j, slot in enumerate(group):
                slot.latent = latents[j : j + 1]
                if slot.inpaint is not None:
                    slot.latent = slot.inpaint.blend(slot.latent, slot.step + 1)
        done: list[_Slot] = []
        for slot in self.slots:
            slot.step += 1
            if slot.step in self.levels and slot.step > slot.item.k and slot.item.edit is None:
                slot.captured[slot.step] = slot.latent.clone()
            if slot.step >= self.total_steps:
                done.append(slot)
        if not done:
            return []
        self.slots = [s for s in self.slots if s.step < self.total_steps]
        pngs: list[bytes] = [b""] * len(done)
        for shape in {s.latent.shape for s in done}:  # decoded together, per size
            rows = [j for j, s in enumerate(done) if s.latent.shape == shape]
            for j, png in zip(rows, self.c.decode(torch.cat([done[j].latent for j in rows]))):
                pngs[j] = png
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


def _array(t: torch.Tensor) -> np.ndarray:
    """A latent as an array: exact in its dtype (bfloat16, which numpy lacks, as float32)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
