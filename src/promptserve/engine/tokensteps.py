"""What the families whose prompts are token lists of their own length share (Z-Image,
Qwen-Image): their parts, and in their steppers the run's sigmas per latent shape and each
member's conditioning as a ``Row`` whose text is its prompt's token states, its negative
prompt's beside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from promptserve.engine.adapterbank import refresh_on_join
from promptserve.engine.base import Look
from promptserve.engine.flow import FlowComponents, sigma_schedule
from promptserve.engine.maskchannels import with_extras
from promptserve.engine.rows import Row, rows_of


@dataclass
class TokenListComponents:
    """A model's parts as loaded or built from configs; a family adds its text encoding
    (``encode(prompts) -> [(L, D) per prompt]``), decoding, guidance and stepper. Latents,
    noise and sizes are Flux's: unpacked (16, H/8, W/8), 2x2 patches."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object  # a transformers tokenizer (the family's template around a prompt)
    scheduler: object  # FlowMatchEulerDiscreteScheduler
    latent_shape: tuple[int, int, int]  # channels, height, width
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_sequence_length: int = 512  # prompt tokens kept (their pipelines' default)
    lora_bank: object = None  # the adapters installed in the transformer (``engine.lora``)
    adapter_names: tuple[str, ...] = ()
    text_lora: dict = field(default_factory=dict)  # none: their encoders take no adapter
    plain_extras: dict = field(default_factory=dict)  # no mask channels: stays empty
    extra_channels = 0
    family = ""  # each family's name

    noise = FlowComponents.noise
    native = FlowComponents.native
    multiple = FlowComponents.multiple

    @property
    def sizes_family(self) -> str:
        return self.family


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
