"""Image-to-image (``engine/edits.py``): an edit's start step and latent, run by the one
denoising loop from there, equal diffusers' own img2img pipelines on the same modules."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from promptserve.engine.denoise import denoise
from promptserve.engine.edits import MaskChannels, edit_start, start_step
from promptserve.engine.flow import unpack
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.errors import InputError

IMG2IMG = {
    "tiny": (diffusers.StableDiffusionImg2ImgPipeline, {}),
    "sdxl": (
        diffusers.StableDiffusionXLImg2ImgPipeline,
        {"force_zeros_for_empty_prompt": False, "add_watermarker": False},
    ),
    "sd3": (diffusers.StableDiffusion3Img2ImgPipeline, {}),
    "flux": (diffusers.FluxImg2ImgPipeline, {}),
    "zimage": (diffusers.ZImageImg2ImgPipeline, {}),
    "qwenimage": (diffusers.QwenImageImg2ImgPipeline, {}),
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
        k, start, _ = edit_start(c, image, strength, seed, steps)
        assert k == start_step(steps, strength, c.family)
        ours, _ = denoise(c, start, ["a red fox"], k, steps, [], guidance)
        kwargs = {"max_sequence_length": c.max_sequence_length} if c.family != "unet" else {}
        theirs = pipe(
            ["a red fox"], image=image, strength=strength, num_inference_steps=steps,
            guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent", height=64, width=64, **kwargs,
        ).images  # fmt: skip
        if c.family in ("flux", "qwenimage"):  # packed 2x2 patches
            theirs = unpack(theirs, 8, 8)
        # 1e-5, against the latents' own scale (a full-strength run ends near 18)
        scale = max(1.0, float(theirs.abs().max()))
        assert torch.abs(ours - theirs).max() <= 1e-5 * scale, (family, strength)
    base = edit_start(c, image, 0.6, seed, steps)[1]
    assert torch.equal(base, edit_start(c, image, 0.6, seed, steps)[1])  # the same seed
    assert torch.abs(edit_start(c, image, 0.6, seed + 1, steps)[1] - base).max() > 1e-2
    # the image is where it starts: another image, another start latent at the same seed
    assert torch.abs(edit_start(c, picture(1), 0.6, seed, steps)[1] - base).max() > 1e-2


INPAINT = {
    "tiny": diffusers.StableDiffusionInpaintPipeline,
    "sdxl": diffusers.StableDiffusionXLInpaintPipeline,
    "sd3": diffusers.StableDiffusion3InpaintPipeline,
    "flux": diffusers.FluxInpaintPipeline,
    "zimage": diffusers.ZImageInpaintPipeline,
    "qwenimage": diffusers.QwenImageInpaintPipeline,
}


def hole() -> Image.Image:
    """White (paint) in a rectangle, black (keep) elsewhere: diffusers' convention."""
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


def assert_inpaints_as(pipe, c, guidance: float) -> None:  # noqa: ANN001 - a pipeline, components
    """Our inpainting with ``c`` ends where ``pipe``'s does, at strengths 0.3, 0.6 and 1.0
    (1e-5 of the latents' scale: a full-strength run ends near 18)."""
    image, steps, seed = picture(), 6, 11
    for strength in (0.3, 0.6, 1.0):
        k, start, member = edit_start(c, image, strength, seed, steps, hole())
        ours, _ = denoise(c, start, ["a red fox"], k, steps, [], guidance, inpaint=[member])
        kwargs = {"max_sequence_length": c.max_sequence_length} if c.family != "unet" else {}
        theirs = pipe(
            ["a red fox"], image=image, mask_image=hole(), strength=strength,
            num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
            height=64, width=64, **kwargs,
        ).images  # fmt: skip
        if c.family in ("flux", "qwenimage"):  # packed 2x2 patches
            theirs = unpack(theirs, 8, 8)
        scale = max(1.0, float(theirs.abs().max()))
        assert torch.abs(ours - theirs).max() <= 1e-5 * scale, strength


@pytest.mark.parametrize("family", sorted(INPAINT))
def test_an_inpainting_equals_the_diffusers_inpaint_pipeline(family):
    c = build(family)
    guidance = 7.5 if c.family == "unet" else 3.5
    pipe = INPAINT[family](**pipeline_for(c, guidance).components, **IMG2IMG[family][1])
    pipe.set_progress_bar_config(disable=True)
    assert_inpaints_as(pipe, c, guidance)


def test_two_seeds_differ_inside_the_mask_and_keep_the_image_outside_it():
    c = build("tiny")
    image, steps = picture(), 6
    runs = []
    for seed in (1, 2):
        k, start, member = edit_start(c, image, 0.8, seed, steps, hole())
        runs.append((denoise(c, start, ["a red fox"], k, steps, [], inpaint=[member])[0], member))
    (a, member_a), (b, member_b) = runs
    inside = member_a.mask.bool().expand_as(a)
    assert torch.abs(a - b)[inside].max() > 1e-2  # the model painted there, per seed
    # outside, each run ends on its own input's latent (its posterior sample, per seed)
    assert torch.equal(a[~inside], member_a.clean[~inside])
    assert torch.equal(b[~inside], member_b.clean[~inside])
    # and a mixed batch: an inpainting and a plain edit side by side, each as alone
    k, start_p, _ = edit_start(c, image, 0.8, 1, steps)
    both, _ = denoise(
        c, torch.cat([edit_start(c, image, 0.8, 1, steps, hole())[1], start_p]),
        ["a red fox", "a red fox"], k, steps, [], inpaint=[member_a, None],
    )  # fmt: skip
    alone, _ = denoise(c, start_p, ["a red fox"], k, steps, [])
    tol = 1e-5 * max(1.0, float(a.abs().max()), float(alone.abs().max()))  # a batch's rounding
    assert torch.abs(both[:1] - a).max() <= tol and torch.abs(both[1:] - alone).max() <= tol


MASK_CHANNELS = {
    "tiny-inpaint": (diffusers.StableDiffusionInpaintPipeline, {}),
    "sdxl-inpaint": (diffusers.StableDiffusionXLInpaintPipeline, IMG2IMG["sdxl"][1]),
    "flux-fill": (diffusers.FluxFillPipeline, {}),
}


def their_pipeline(cls, c, guidance: float, extra: dict):  # noqa: ANN001, ANN201
    """``cls`` over our modules, given the components its constructor takes."""
    import inspect

    wanted = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in pipeline_for(c, guidance).components.items() if k in wanted}
    pipe = cls(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", sorted(MASK_CHANNELS))
def test_a_model_with_mask_channels_inpaints_as_its_diffusers_pipeline(family):
    """A 9-channel inpainting UNet (SD 1.x, SDXL) and Flux Fill: the mask and the masked
    image's latent beside the latent in every call, nothing blended; equal to the dedicated
    pipeline at every strength, and its generations run with every pixel painted."""
    c = build(family)
    assert c.extra_channels == (5 if c.family == "unet" else 80)
    cls, extra = MASK_CHANNELS[family]
    guidance = 7.5 if c.family == "unet" else 3.5
    pipe = their_pipeline(cls, c, guidance, extra)
    assert_inpaints_as(pipe, c, guidance)
    image, steps, seed = picture(), 6, 11
    # a generation on it (every pixel painted: the plain channels) is the same alone as in a
    # batch with an inpainting member
    noise = c.noise(3)
    alone, _ = denoise(c, noise, ["a boat"], 0, steps, [], guidance)
    k, start, member = edit_start(c, image, 1.0, seed, steps, hole())
    assert isinstance(member, MaskChannels) and member.extra.shape[1] == c.extra_channels
    both, _ = denoise(
        c, torch.cat([noise, start]), ["a boat", "a red fox"], 0, steps, [], guidance,
        inpaint=[None, member],
    )  # fmt: skip
    tol = 1e-5 * max(1.0, float(alone.abs().max()))
    assert torch.abs(both[:1] - alone).max() <= tol
    assert torch.isfinite(alone).all() and torch.abs(alone - noise).max() > 1e-2


@pytest.mark.parametrize("family", ["tiny-inpaint", "flux-fill"])
def test_a_saved_inpainting_folder_is_served_with_its_mask_channels(family, tmp_path):
    """A folder whose pipeline is a dedicated inpainting one is served: generations (every
    pixel painted) and edits through the official client, its mask channels in every call."""
    import base64
    import io

    from factories import client
    from promptserve.engine.diffusers_backend import family_of
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    c = build(family)
    cls, extra = MASK_CHANNELS[family]
    extra = {"requires_safety_checker": False} if c.family == "unet" else extra
    their_pipeline(cls, c, 3.5, extra).save_pretrained(tmp_path / "model")
    assert family_of(str(tmp_path / "model")) == c.family
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c", slo_s=300,
        sizes=((64, 64),),
    )  # fmt: skip
    out = io.BytesIO()
    picture().save(out, format="PNG")
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[16:48, 16:48, 3] = 0
    hole_png = io.BytesIO()
    Image.fromarray(mask).save(hole_png, format="PNG")
    with LiveServer(build_app(config)) as url:
        images = client(url).images
        made = images.generate(prompt="a red fox", size="64x64")
        painted = [
            images.edit(
                image=("in.png", out.getvalue(), "image/png"), prompt="a red door",
                mask=("m.png", hole_png.getvalue(), "image/png"), size="64x64",
                extra_body={"seed": seed},
            )
            for seed in (1, 2)
        ]  # fmt: skip
    assert made.data[0].b64_json
    a, b = (
        np.asarray(Image.open(io.BytesIO(base64.b64decode(p.data[0].b64_json))), dtype=float)
        for p in painted
    )
    assert np.abs(a[16:48, 16:48] - b[16:48, 16:48]).mean() > 1.0  # painted per seed
    assert (a[:16] == np.asarray(picture())[:16]).all()  # kept outside the mask
    assert painted[0].data[0].model_extra["promptserve"]["edit_start"] == 0


def test_an_instruction_edit_equals_flux_kontext_and_joins_a_running_batch():
    """Flux Kontext: the edit runs every step from its seed's noise, its image's tokens beside
    its own; equal to ``FluxKontextPipeline``; in a step-level run beside a generation (another
    sequence length: another call) each equals its run alone."""
    from promptserve.engine.base import EditInput, GenerationItem
    from promptserve.engine.steprunner import StepRunner
    from promptserve.engine.tiny import DenoisingEngine

    c = build("flux-kontext")
    pipe = pipeline_for(c, 3.5)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    image, steps, seed = picture(), 6, 11
    k, start, member = edit_start(c, image, 0.6, seed, steps)  # the strength changes nothing
    assert k == 0 and member is not None and member.context is not None
    ours, _ = denoise(c, start, ["make it red"], k, steps, [], 3.5, inpaint=[member])
    theirs = pipe(
        image=image, prompt=["make it red"], num_inference_steps=steps, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", height=64,
        width=64, max_sequence_length=c.max_sequence_length, _auto_resize=False,
        max_area=64 * 64,
    ).images  # fmt: skip
    theirs = unpack(theirs, 8, 8)
    assert torch.abs(ours - theirs).max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    engine = DenoisingEngine(c, "tiny-kontext", steps, (0, 2), 3.5)
    assert engine.edit_family == "kontext"
    gen = GenerationItem("a lighthouse", 0, seed=1)
    edit = GenerationItem("make it red", seed=seed, edit=EditInput(np.asarray(image), 0.6))
    alone = engine.generate([gen])[0].final_latent
    runner = StepRunner(c, steps, (0, 2), 3.5)
    runner.join([("gen", gen)])
    runner.step()
    runner.join([("edit", edit)])
    done = {}
    while runner.slots:
        done.update(runner.step())
    tol = 1e-5 * max(1.0, float(theirs.abs().max()))
    assert np.abs(done["gen"].final_latent - alone).max() <= tol
    assert np.abs(done["edit"].final_latent - ours[0].numpy()).max() <= tol
    batch = engine.generate([gen, edit])  # the batch engine: each as alone too
    assert np.abs(batch[1].final_latent - ours[0].numpy()).max() <= tol and batch[1].k == 0


def test_a_saved_kontext_folder_serves_instruction_edits_and_refuses_a_mask(tmp_path):
    import base64
    import io

    import openai

    from factories import client
    from promptserve.engine.diffusers_backend import family_of
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    pipeline_for(build("flux-kontext"), 3.5).save_pretrained(tmp_path / "model")
    assert family_of(str(tmp_path / "model")) == "flux"
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c", slo_s=300,
        sizes=((64, 64),), steps=4,
    )  # fmt: skip
    out = io.BytesIO()
    picture().save(out, format="PNG")
    with LiveServer(build_app(config)) as url:
        images = client(url).images
        edits = [
            images.edit(
                image=("in.png", out.getvalue(), "image/png"), prompt="make the sky red",
                extra_body={"seed": seed},
            )
            for seed in (1, 1, 2)
        ]  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="mask"):
            images.edit(
                image=("in.png", out.getvalue(), "image/png"), prompt="x",
                mask=("m.png", out.getvalue(), "image/png"),
            )  # fmt: skip
        made = images.generate(prompt="a red fox", size="64x64")
    pngs = [base64.b64decode(e.data[0].b64_json) for e in edits]
    assert pngs[0] == pngs[1] != pngs[2]  # the seed's, whatever else ran
    assert edits[0].data[0].model_extra["promptserve"]["edit_start"] == 0  # every step
    assert made.data[0].b64_json
