"""What the steppers of the families whose prompts are token lists of their own length share
(Z-Image, Qwen-Image): the run's sigmas per latent shape, and each member's conditioning as a
``Row`` whose text is its prompt's token states, its negative prompt's beside them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from promptserve.engine.adapterbank import refresh_on_join
from promptserve.engine.base import Look
from promptserve.engine.flow import sigma_schedule
from promptserve.engine.maskchannels import with_extras
from promptserve.engine.rows import Row, rows_of


class TokenListStepper:
    """The family's components (``c``) give ``encode(prompts) -> [(L, D) per prompt]``."""

    def __init__(self, c, total_steps: int, guidance: float) -> None:  # noqa: ANN001
        self.c, self.guidance, self.total_steps = c, guidance, total_steps
        self._schedules: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        (self.uncond,) = self._conditioning([""])  # the empty negative prompt, encoded once

    def schedule(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigmas and timesteps of a latent shape (shifted by its token count)."""
        if shape not in self._schedules:
            self._schedules[shape] = sigma_schedule(self.c, self.total_steps, shape)
        return self._schedules[shape]

    def encode(self, prompts: Sequence[str], looks: Sequence[Look] | None = None) -> list[Row]:
        refresh_on_join([self.c.lora_bank], looks)  # a private bank loads their adapters
        rows = rows_of(
            self._conditioning, prompts, looks, self.guidance, self.uncond, self.c.native
        )
        return with_extras(self.c, rows)

    def _conditioning(
        self, prompts: Sequence[str], loras: Sequence[tuple] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        return [{"tokens": states} for states in self.c.encode(prompts)]
