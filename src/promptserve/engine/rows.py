"""A member's conditioning as every family's stepper takes it (``Row``), made once per member
at its join and kept by the step runner between steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptserve.engine.base import Look


@dataclass(frozen=True, slots=True)
class Row:
    """One member's conditioning: its text's, its negative prompt's (the stepper's shared
    empty-prompt rows unless it has one; None where the family has no negative pass), and its
    guidance scale."""

    text: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    scale: float
    size: tuple[int, int]  # (width, height) in pixels
    lora: tuple[tuple[str, float], ...] = ()  # its adapters (``engine.lora``)
    # a model with mask channels (a 9-channel inpainting UNet, Flux Fill): what goes into
    # every call beside its latent, (1, E, h, w) unpacked (``maskchannels.mask_channels``)
    extra: torch.Tensor | None = None
    # an instruction edit: its image's packed latent tokens, attended beside its own in every
    # call, and their position ids (Flux Kontext) or each image's (frames, h, w) (Qwen-Image-Edit)
    context: tuple[torch.Tensor, torch.Tensor | tuple] | None = None


def context_key(context: tuple | None) -> tuple | None:
    """What members must share to be in one call with their context tokens: the token count,
    and each image's shape where the positions are made from them (Kontext's ids follow the
    latent's shape, which a call shares already)."""
    if context is None:
        return None
    return context[0].shape[1], context[1] if isinstance(context[1], tuple) else None


def rows_of(
    encode_batch,  # noqa: ANN001 - prompts -> list of each prompt's conditioning dict
    prompts: Sequence[str],
    looks: Sequence[Look] | None,
    default_scale: float,
    empty: dict[str, torch.Tensor] | None,
    native: tuple[int, int],
    text_loras=lambda look: (),  # noqa: ANN001 - a look's adapters with text-encoder weights
) -> list[Row]:
    """Each prompt's ``Row``; the distinct negative prompts are encoded once, together, per
    set of text-encoder adapters (``text_loras``: the adapters of a look that change its text
    encoding; the empty prompt without any is the shared ``empty``)."""
    looks = list(looks) if looks is not None else [Look()] * len(prompts)
    te = [text_loras(look) for look in looks]
    wanted = {(lk.negative_prompt, t) for lk, t in zip(looks, te, strict=True)}
    negatives = sorted(n for n in wanted if n[0] or n[1])
    uncond = {}
    if negatives:
        encoded = encode_batch([n for n, _ in negatives], [t for _, t in negatives])
        uncond = dict(zip(negatives, encoded, strict=True))
    return [
        Row(
            text,
            uncond.get((look.negative_prompt, t), empty),
            default_scale if look.guidance is None else look.guidance,
            look.size or native,
            look.lora,
        )
        for text, look, t in zip(encode_batch(prompts, te), looks, te, strict=True)
    ]


def scales_of(rows: Sequence[Row], like: torch.Tensor) -> float | torch.Tensor:
    """The rows' guidance scales: one number when they share it (the plain batch computes
    exactly as before), else one per row, shaped to broadcast over ``like``."""
    first = rows[0].scale
    if all(r.scale == first for r in rows):
        return first
    shape = (-1,) + (1,) * (like.dim() - 1)
    return torch.tensor([r.scale for r in rows], device=like.device, dtype=like.dtype).view(shape)
