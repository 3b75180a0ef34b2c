"""Qwen-Image-Edit (``engine/qwenedit.py``): instruction edits of one to three images, equal to
diffusers' ``QwenImageEditPlusPipeline`` on a tiny random config, members of step-level runs
beside edits of other image shapes, sizes and intervals, and served from a saved folder."""

import base64
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from factories import client
from promptserve.engine.base import EditInput, GenerationItem, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.diffusers_backend import family_of, pipeline_class
from promptserve.engine.edits import edit_start
from promptserve.engine.flow import pack, unpack
from promptserve.engine.pipelines import pipeline_for, save_pipeline
from promptserve.engine.shapes import build
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import DenoisingEngine

STEPS = 3


@pytest.fixture(autouse=True)
def small_images(monkeypatch):
    """The images' latent tokens from about 256x256, not 1024x1024, on both sides (the
    pipeline's constant and ours): the same computation, a sixteenth of it on a CPU."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    from promptserve.engine import qwenedit

    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 256 * 256)
    monkeypatch.setattr(qwenedit, "VAE_AREA", 256 * 256)


@pytest.fixture(scope="module")
def c():
    return build("qwenimage-edit")


def picture(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return float(torch.abs(ours - theirs).max()) <= 1e-5 * max(1.0, float(theirs.abs().max()))


@pytest.mark.parametrize(("images", "negative"), [(1, None), (2, "blurry")])
def test_an_edit_equals_the_diffusers_edit_plus_pipeline(c, images, negative):
    """From step 0 whatever the strength; the images read by the text encoder and appended as
    latent tokens; with a negative prompt, true CFG on the same images."""
    pipe = pipeline_for(c, 4.0)
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    inputs = [picture(1), picture(2, 64, 40)][:images]
    k, start, member = edit_start(
        c, inputs[0], 0.6, 7, STEPS, prompt="make it red", negative=negative,
        more=tuple(inputs[1:]),
    )  # fmt: skip
    assert k == 0 and len(member.context[1]) == images
    ours, _ = denoise(c, start, ["make it red"], k, STEPS, [], 4.0, inpaint=[member])
    theirs = pipe(
        image=inputs, prompt="make it red", negative_prompt=negative, true_cfg_scale=4.0,
        latents=pack(start), height=64, width=64, num_inference_steps=STEPS,
        output_type="latent",
    ).images  # fmt: skip
    assert close(ours, unpack(theirs, 8, 8))


def test_edits_of_other_shapes_sizes_and_intervals_each_equal_their_run_alone(c):
    """A step-level run: edits whose images give other token shapes (their own calls), one at
    another output size, one guided by a negative prompt, one on a feature-cache interval,
    joined a step apart; each equals its run alone, and the batch engine's."""
    engine = DenoisingEngine(c, "tiny-qwen-edit", STEPS, (0, 1), 4.0)
    assert engine.edit_family == "qwen-edit"
    square, wide = np.asarray(picture(3)), np.asarray(picture(4, 64, 32))
    items = [
        GenerationItem("make it red", seed=1, edit=EditInput(square, 0.6)),
        GenerationItem("add a moon", seed=2, edit=EditInput(wide, 0.6, more=(square,)),
                       look=Look(negative_prompt="fog", size=(96, 64))),
        GenerationItem("make it blue", seed=3, edit=EditInput(square, 0.6), interval=2),
    ]  # fmt: skip
    alone = [engine.generate([it])[0].final_latent for it in items]
    runner = StepRunner(c, STEPS, (0, 1), 4.0)
    runner.join([(0, items[0])])
    runner.step()
    runner.join([(1, items[1]), (2, items[2])])
    done = {}
    while runner.slots:
        done.update(runner.step())
    batch = engine.generate(items)
    for i, latent in enumerate(alone):
        tol = 1e-5 * max(1.0, np.abs(latent).max())
        assert np.abs(done[i].final_latent - latent).max() <= tol, i
        assert np.abs(batch[i].final_latent - latent).max() <= tol, i
    assert np.abs(alone[0] - alone[2]).max() > 1e-3  # the prompts and intervals tell


def test_a_saved_edit_folder_serves_edits_of_several_images_and_refuses_the_rest(tmp_path):
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    # a model of its own: feature caching wraps the shared one's blocks in place
    save_pipeline(pipeline_for(build("qwenimage-edit"), 4.0), tmp_path / "model")
    assert pipeline_class(str(tmp_path / "model")) == "QwenImageEditPlusPipeline"
    assert family_of(str(tmp_path / "model")) == "qwenimage"
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c", slo_s=300,
        sizes=((64, 64),), steps=STEPS,
    )  # fmt: skip
    files = []
    for seed in (5, 6, 7, 8):
        out = io.BytesIO()
        picture(seed).save(out, format="PNG")
        files.append((f"{seed}.png", out.getvalue(), "image/png"))
    with LiveServer(build_app(config)) as url:
        images = client(url).images
        card = client(url).models.list().data[0].model_extra
        two = [
            images.edit(image=files[:2], prompt="put them side by side", extra_body={"seed": s})
            for s in (1, 1)
        ]
        one = images.edit(image=files[0], prompt="put them side by side", extra_body={"seed": 1})
        streamed = list(
            images.edit(image=files[:2], prompt="a red sky", stream=True, partial_images=1)
        )
        refusals = {}
        for name, call in {
            "generation": lambda: images.generate(prompt="a red fox"),
            "mask": lambda: images.edit(image=files[0], mask=files[1], prompt="x"),
            "four": lambda: images.edit(image=files, prompt="x"),
        }.items():
            with pytest.raises(openai.BadRequestError) as refused:
                call()
            refusals[name] = refused.value.body
    pngs = [base64.b64decode(e.data[0].b64_json) for e in (*two, one)]
    assert pngs[0] == pngs[1] != pngs[2]  # the second image tells; the seed repeats
    assert two[0].data[0].model_extra["promptserve"]["edit_start"] == 0
    assert streamed[-1].type == "image_edit.completed" and streamed[-1].b64_json
    assert card["accepts"]["generations"] is False and card["accepts"]["images_per_edit"] == 3
    assert card["family"] == "qwen-edit" and card["accepts"]["mask"] is False
    assert "/v1/images/edits" in refusals["generation"]["message"]
    assert refusals["mask"]["param"] == "mask" and refusals["four"]["param"] == "image"
    assert "4 images" in refusals["four"]["message"]
