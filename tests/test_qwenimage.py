"""Qwen-Image (``engine/qwenimage.py``) in our loop: equal to diffusers' ``QwenImagePipeline``
on a tiny random config (true CFG with a negative prompt, and without), resumable at K, a
member of step-level runs, and served from a saved folder."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from factories import client, until_cached
from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.diffusers_backend import family_of
from promptserve.engine.flow import pack, unpack
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import DenoisingEngine

STEPS = 4


@pytest.fixture(scope="module")
def c():
    return build("qwenimage")


@pytest.mark.parametrize("negative", [None, "fog"])
def test_a_run_equals_the_diffusers_pipeline(c, negative):
    """Without a negative prompt the pipeline runs one pass whatever its scale; with one, its
    true CFG rescaled per token. At the model's own size and another."""
    pipe = pipeline_for(c, 4.0)
    for size in (None, (96, 64)):
        noise = c.noise(5, size)
        look = Look(negative_prompt=negative, size=size)
        ours, _ = denoise(c, noise, ["a red fox"], 0, STEPS, [], 4.0, looks=[look])
        w, h = size or c.native
        theirs = pipe(
            ["a red fox"], negative_prompt=negative, true_cfg_scale=4.0, latents=pack(noise),
            height=h, width=w, num_inference_steps=STEPS, output_type="latent",
        ).images  # fmt: skip
        theirs = unpack(theirs, h // 8, w // 8)
        assert torch.abs(ours - theirs).max() <= 1e-5 * max(1.0, float(theirs.abs().max()))


def test_a_run_resumed_at_k_equals_the_full_run_and_members_equal_their_runs_alone(c):
    noise = c.noise(1)
    full, captured = denoise(c, noise, ["a lighthouse"], 0, STEPS, [1, 2])
    for k in (1, 2):
        resumed, _ = denoise(c, captured[k], ["a lighthouse"], k, STEPS, [])
        assert torch.abs(resumed - full).max() <= 1e-5 * max(1.0, float(full.abs().max()))
    engine = DenoisingEngine(c, "tiny-qwenimage", STEPS, (0, 1, 2), 4.0)
    items = [  # prompts of other lengths, a negative prompt (its CFG pass), another size
        GenerationItem("a red fox", 0, seed=1),
        GenerationItem("a small boat on a very calm lake at dawn", 0, seed=2,
                       look=Look(negative_prompt="fog, rain", guidance=3.0)),
        GenerationItem("a castle", 0, seed=3, look=Look(size=(96, 64))),
    ]  # fmt: skip
    alone = [engine.generate([it])[0].final_latent for it in items]
    runner = StepRunner(c, STEPS, (0, 1, 2), 4.0)
    runner.join([(0, items[0])])
    runner.step()
    runner.join([(1, items[1]), (2, items[2])])  # a step behind
    done = {}
    while runner.slots:
        done.update(runner.step())
    for i, latent in enumerate(alone):
        assert np.abs(done[i].final_latent - latent).max() <= 1e-5 * max(1.0, np.abs(latent).max())


def test_a_saved_qwenimage_folder_is_served_generations_and_edits(c, tmp_path):
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    pipeline_for(c, 4.0).save_pretrained(tmp_path / "model")
    assert family_of(str(tmp_path / "model")) == "qwenimage"
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c", slo_s=300,
        sizes=((64, 64),), policy="continuous-ht", steps=STEPS,
    )  # fmt: skip
    with LiveServer(build_app(config)) as url:
        oai = client(url)
        first = oai.images.generate(prompt="a red fox in the snow", size="64x64")
        until_cached(url, 1)
        again = oai.images.generate(
            prompt="a red fox in the snow", extra_body={"negative_prompt": "fog"}
        )
        card = oai.models.list().data[0].model_extra
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(out, format="PNG")
        edit = oai.images.edit(
            image=("a.png", out.getvalue(), "image/png"), prompt="a boat",
            extra_body={"strength": 0.5},
        )  # fmt: skip
    png = base64.b64decode(first.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert again.data[0].model_extra["promptserve"]["guidance_scale"] == 4.0
    assert card["family"] == "qwenimage" and card["steps"] == STEPS
    assert card["accepts"]["edits"] is True and card["accepts"]["negative_prompt"] is True
    assert edit.data[0].model_extra["promptserve"]["edit_start"] == STEPS // 2
