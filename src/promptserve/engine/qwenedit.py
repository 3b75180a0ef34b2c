"""Qwen-Image-Edit (``QwenImageEditPlusPipeline``): instruction edits of one to three images.
Each input image conditions twice, as its pipeline does: seen by the Qwen2.5-VL text encoder
beside the prompt (resized to about 384x384, "Picture i:" before each), and as tokens of its
latent (resized to about 1024x1024, the VAE's mode, normalised per channel) appended after the
member's own in every transformer call, their shapes in the rotary positions. The member runs
every step from the seed's noise; nothing is blended.

It is Qwen-Image's loop and stepper: a member's conditioning is a ``Row`` whose text is its
prompt read with its images (its negative prompt too, for true CFG) and whose context is its
images' tokens; members whose images give the same token shapes share a call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from promptserve.engine.flow import pack
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.rows import Row

# the pipeline's template for edits, and the tokens of its system part dropped from the states
TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 64
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
CONDITION_AREA = 384 * 384  # what the text encoder sees of each image
VAE_AREA = 1024 * 1024  # what the transformer sees of each image, as latent tokens
MAX_IMAGES = 3  # the images one edit takes (the model card's 1 to 3)


def dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio``, multiples of 32 (the pipeline's)."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


@dataclass
class ImageConditioning:
    """An instruction edit's images as its member carries them: its prompt's (and negative
    prompt's) token states read with the images, and the images' latent tokens with the
    (frames, h, w) of each, in order."""

    text: torch.Tensor  # (L, D)
    uncond: torch.Tensor | None  # None: no negative prompt (no CFG pass, as the pipeline)
    context: tuple[torch.Tensor, tuple[tuple[int, int, int], ...]]  # (1, T, 64), shapes
    extra = None

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        return latents

    def conditioned(self, row: Row) -> Row:
        uncond = row.uncond if self.uncond is None else {"tokens": self.uncond}
        return replace(row, text={"tokens": self.text}, uncond=uncond, context=self.context)


@dataclass
class QwenEditComponents(QwenImageComponents):
    """Qwen-Image-Edit's parts: Qwen-Image's, and the image processor of its text encoder's
    vision tower (the pipeline's ``processor`` without its video half)."""

    image_processor: object = None
    reads_images = True  # the edit's images go to the text encoder too

    def encode_with_images(
        self, prompts: Sequence[str], images: Sequence[Image.Image]
    ) -> list[torch.Tensor]:
        """Each prompt's token states read after the images (``PICTURE`` each), as the
        pipeline's processor and text encoder make them: each image's pad token repeated
        once per merged patch of its grid."""
        seen = self.image_processor(images=list(images), return_tensors="pt")  # type: ignore[operator]
        grid = seen["image_grid_thw"]
        merge = self.image_processor.merge_size**2  # type: ignore[attr-defined]
        pictures = "".join(PICTURE.format(i + 1) for i in range(len(images)))
        texts = []
        for prompt in prompts:
            text = TEMPLATE.format(pictures + prompt)
            for thw in grid:  # in order: the processor's placeholder expansion
                text = text.replace(IMAGE_PAD, "<|placeholder|>" * int(thw.prod() // merge), 1)
            texts.append(text.replace("<|placeholder|>", IMAGE_PAD))
        ids = self.tokenizer(texts, padding=True, return_tensors="pt")  # type: ignore[operator]
        mask = ids.attention_mask.to(self.device)
        with torch.no_grad():
            states = self.text_encoder(
                input_ids=ids.input_ids.to(self.device), attention_mask=mask,
                pixel_values=seen["pixel_values"].to(self.device, self.text_encoder.dtype),
                image_grid_thw=grid.to(self.device), output_hidden_states=True,
            ).hidden_states[-1]  # fmt: skip
        return [states[i][mask[i].bool()][DROP:].to(self.dtype) for i in range(len(prompts))]

    def image_tokens(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, tuple[tuple[int, int, int], ...]]:
        """The images' latent tokens, one after another, and each one's (1, h/2, w/2)."""
        from diffusers.image_processor import VaeImageProcessor

        process = VaeImageProcessor(vae_scale_factor=16)
        tokens, shapes = [], []
        for image in images:
            width, height = dimensions(VAE_AREA, image.width / image.height)
            pixels = process.preprocess(image, height, width).to(self.device, self.dtype)
            with torch.no_grad():
                mode = self.vae.encode(pixels[:, :, None]).latent_dist.mode()
            mean, std = self._scale(mode)
            latent = ((mode - mean) / std)[:, :, 0]
            tokens.append(pack(latent))
            shapes.append((1, latent.shape[2] // 2, latent.shape[3] // 2))
        return torch.cat(tokens, dim=1), tuple(shapes)

    def instruction_start(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        negative: str | None,
        seed: int,
        size: tuple[int, int],
    ) -> tuple[int, torch.Tensor, ImageConditioning]:
        """Step 0 from the seed's noise, the images its conditioning (``ImageConditioning``)."""
        from diffusers.image_processor import VaeImageProcessor

        resize = VaeImageProcessor(vae_scale_factor=16).resize
        seen = []
        for image in images:
            width, height = dimensions(CONDITION_AREA, image.width / image.height)
            seen.append(resize(image, height, width))
        # each prompt read alone, as the pipeline reads them (no padding between the two)
        (text,) = self.encode_with_images([prompt], seen)
        uncond = self.encode_with_images([negative], seen)[0] if negative else None
        conditioning = ImageConditioning(text, uncond, self.image_tokens(images))
        return 0, self.noise(seed, size), conditioning
