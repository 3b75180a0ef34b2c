"""What an edit's strength means in steps, for the engine that runs it and the policy that
prices it (both must count the same steps, and the policy imports no engine)."""

from __future__ import annotations

from promptserve.errors import InputError

# diffusers' pipelines' defaults: an edit without a mask keeps most of its image, an
# inpainting one repaints the masked region from noise
DEFAULT_STRENGTH = 0.6
DEFAULT_MASKED_STRENGTH = 1.0
# instruction-edit models: the image conditions every step (no start, no mask); Qwen-Image-Edit
# reads up to three images and, its pipeline needing one, makes no plain generation
INSTRUCTION_EDITS = ("kontext", "qwen-edit")
EDITS_ONLY = ("qwen-edit",)


def images_taken(family: str) -> int:
    """How many input images one edit of ``family`` takes."""
    return 3 if family == "qwen-edit" else 1


def start_step(total_steps: int, strength: float, family: str = "unet") -> int:
    """The step an edit at ``strength`` starts from, as the family's img2img pipeline counts
    it: the UNet pipelines run the last int(N s) steps; SD3's and Flux's start at
    int(N - N s), so they run one more where N s is not whole; an instruction-edit model's
    (Flux Kontext, Qwen-Image-Edit) from step 0, its image a condition, not a start."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if family in INSTRUCTION_EDITS:  # an instruction edit: every step, its image a condition
        return 0
    if family == "unet":
        return total_steps - min(int(total_steps * strength), total_steps)
    return int(max(total_steps - min(total_steps * strength, total_steps), 0))
