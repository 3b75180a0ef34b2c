"""Image-to-image (``engine/edits.py``): an edit's start step and latent, run by the one
denoising loop from there, equal diffusers' own img2img pipelines on the same modules."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from promptserve.engine.denoise import denoise
from promptserve.engine.edits import edit_start, start_step
from promptserve.engine.flow import unpack
from promptserve.engine.shapes import build, pipeline_for
from promptserve.errors import InputError

IMG2IMG = {
    "tiny": (diffusers.StableDiffusionImg2ImgPipeline, {}),
    "sdxl": (
        diffusers.StableDiffusionXLImg2ImgPipeline,
        {"force_zeros_for_empty_prompt": False, "add_watermarker": False},
    ),
    "sd3": (diffusers.StableDiffusion3Img2ImgPipeline, {}),
    "flux": (diffusers.FluxImg2ImgPipeline, {}),
}


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_the_start_step_is_the_pipelines_and_a_bad_strength_is_refused_by_name():
    assert [start_step(50, s) for s in (0.3, 0.6, 1.0)] == [35, 20, 0]
    assert start_step(6, 0.1) == 6  # int(0.6) = 0 steps: the UNet pipelines run none either
    # SD3's and Flux's pipelines start at int(N - N s): one step more where N s is not whole
    assert [start_step(6, s, "flux") for s in (0.3, 0.6, 1.0)] == [4, 2, 0]
    assert [start_step(6, s) for s in (0.3, 0.6, 1.0)] == [5, 3, 0]
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(InputError, match="strength"):
            start_step(50, bad)


@pytest.mark.parametrize("family", sorted(IMG2IMG))
def test_an_edit_equals_the_diffusers_img2img_pipeline(family):
    c = build(family)
    cls, extra = IMG2IMG[family]
    guidance = 7.5 if c.family == "unet" else 3.5
    pipe = cls(**pipeline_for(c, guidance).components, **extra)
    pipe.set_progress_bar_config(disable=True)
    image, steps, seed = picture(), 6, 11
    for strength in (0.3, 0.6, 1.0):
        k, start = edit_start(c, image, strength, seed, steps)
        assert k == start_step(steps, strength, c.family)
        ours, _ = denoise(c, start, ["a red fox"], k, steps, [], guidance)
        kwargs = {"max_sequence_length": c.max_sequence_length} if c.family != "unet" else {}
        theirs = pipe(
            ["a red fox"], image=image, strength=strength, num_inference_steps=steps,
            guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent", height=64, width=64, **kwargs,
        ).images  # fmt: skip
        if c.family == "flux":
            theirs = unpack(theirs, 8, 8)
        # 1e-5, against the latents' own scale (a full-strength run ends near 18)
        scale = max(1.0, float(theirs.abs().max()))
        assert torch.abs(ours - theirs).max() <= 1e-5 * scale, (family, strength)
    base = edit_start(c, image, 0.6, seed, steps)[1]
    assert torch.equal(base, edit_start(c, image, 0.6, seed, steps)[1])  # the same seed
    assert torch.abs(edit_start(c, image, 0.6, seed + 1, steps)[1] - base).max() > 1e-2
    # the image is where it starts: another image, another start latent at the same seed
    assert torch.abs(edit_start(c, picture(1), 0.6, seed, steps)[1] - base).max() > 1e-2
