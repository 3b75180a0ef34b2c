"""Z-Image (``engine/zimage.py``) in our loop: equal to diffusers' ``ZImagePipeline`` on a tiny
random config, resumable at K, a member of step-level runs, and served from a saved folder."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from factories import client, until_cached
from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.diffusers_backend import diffusers_engine, family_of
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import DenoisingEngine

STEPS = 6


@pytest.fixture(scope="module")
def c():
    return build("zimage")


def theirs(c, prompt: str, noise: torch.Tensor, guidance: float, **kw) -> torch.Tensor:  # noqa: ANN001, ANN003
    pipe = pipeline_for(c, guidance)
    w, h = noise.shape[3] * 8, noise.shape[2] * 8
    return pipe(
        [prompt], latents=noise, height=h, width=w, num_inference_steps=STEPS,
        guidance_scale=guidance, output_type="latent",
        max_sequence_length=c.max_sequence_length, **kw,
    ).images  # fmt: skip


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_a_run_equals_the_diffusers_pipeline_with_and_without_guidance(c, guidance):
    """Turbo's 0 (no negative pass) and a guided run (against the empty prompt and against a
    negative prompt), at the model's own size and another."""
    for size in (None, (96, 64)):
        noise = c.noise(5, size)
        look = Look(size=size)
        ours, _ = denoise(c, noise, ["a red fox"], 0, STEPS, [], guidance, looks=[look])
        ref = theirs(c, "a red fox", noise, guidance)
        assert torch.abs(ours - ref).max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    if guidance:
        noise = c.noise(6)
        look = Look(negative_prompt="fog")
        ours, _ = denoise(c, noise, ["a red fox"], 0, STEPS, [], guidance, looks=[look])
        ref = theirs(c, "a red fox", noise, guidance, negative_prompt="fog")
        assert torch.abs(ours - ref).max() <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_a_run_resumed_at_k_from_its_latent_equals_the_full_run(c):
    noise = c.noise(1)
    full, captured = denoise(c, noise, ["a lighthouse"], 0, STEPS, [2, 4], 2.0)
    for k in (2, 4):
        resumed, _ = denoise(c, captured[k], ["a lighthouse"], k, STEPS, [], 2.0)
        assert torch.abs(resumed - full).max() <= 1e-5 * max(1.0, float(full.abs().max()))


def test_members_at_different_steps_sizes_and_scales_equal_their_runs_alone(c):
    engine = DenoisingEngine(c, "tiny-zimage", STEPS, (0, 2, 4), 0.0)
    items = [
        GenerationItem("a red fox", 0, seed=1),
        GenerationItem("a boat", 0, seed=2, look=Look(size=(96, 64), guidance=2.0)),
        GenerationItem("a castle", 0, seed=3, look=Look(guidance=3.0, negative_prompt="fog")),
    ]
    alone = [engine.generate([it])[0].final_latent for it in items]
    runner = StepRunner(c, STEPS, (0, 2, 4), 0.0)
    runner.join([(0, items[0])])
    runner.step()
    runner.step()
    runner.join([(1, items[1]), (2, items[2])])  # two steps behind, another size, guided
    done = {}
    while runner.slots:
        done.update(runner.step())
    for i, latent in enumerate(alone):
        assert np.abs(done[i].final_latent - latent).max() <= 1e-5 * max(1.0, np.abs(latent).max())
    assert engine.caps.feature_cache is True  # layer reuse offers intervals above 1


def test_a_saved_zimage_folder_is_served_with_its_turbo_schedule(c, tmp_path):
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    pipeline_for(c, 0.0).save_pretrained(tmp_path / "model")
    assert family_of(str(tmp_path / "model")) == "zimage"
    engine = diffusers_engine(str(tmp_path / "model"))
    assert engine.total_steps == 8 and engine.levels == (0, 1, 2, 3, 4)
    assert engine.guidance_spec.kind == "cfg" and engine.guidance == 0.0
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c", slo_s=300,
        sizes=((64, 64), (96, 64)), policy="continuous-ht",
    )  # fmt: skip
    with LiveServer(build_app(config)) as url:
        images = client(url).images
        first = images.generate(prompt="a red fox in the snow", size="64x64")
        until_cached(url, 1)
        again = images.generate(prompt="a red fox in the snow", size="64x64")
        wide = images.generate(prompt="a boat", size="96x64", extra_body={"guidance_scale": 2})
        edit = images.edit(
            image=("in.png", png(), "image/png"), prompt="a boat", size="64x64",
            extra_body={"strength": 0.5},
        )  # fmt: skip
        card = client(url).models.list().data[0].model_extra
    assert first.data[0].model_extra["promptserve"]["level_k"] == 0
    twin = again.data[0].model_extra["promptserve"]
    assert twin["cache_hit"] and twin["level_k"] > 0  # resumed from its neighbour at K
    assert Image.open(io.BytesIO(base64.b64decode(wide.data[0].b64_json))).size == (96, 64)
    assert edit.data[0].model_extra["promptserve"]["edit_start"] == 4
    # the model says what it runs and takes
    assert card["family"] == "zimage" and card["steps"] == 8 and card["levels"] == [0, 1, 2, 3, 4]
    assert card["guidance"]["kind"] == "cfg" and card["guidance"]["default"] == 0.0
    assert card["accepts"] == {
        "negative_prompt": True, "guidance_scale": True, "edits": True, "generations": True,
        "mask": True, "images_per_edit": 1,
    }  # fmt: skip


def png() -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_model_tiny_writes_a_folder_serve_reads_and_refuses_bad_flags(tmp_path):
    from typer.testing import CliRunner

    from promptserve.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["model", "tiny", "--family", "zimage", "--out", str(tmp_path / "z")])
    assert ok.exit_code == 0, ok.output
    assert family_of(str(tmp_path / "z")) == "zimage"
    engine = diffusers_engine(str(tmp_path / "z"))
    engine.set_sizes([(64, 64)])
    item = GenerationItem("a red fox", 0, seed=1, look=Look(size=(64, 64)))
    assert engine.generate([item])[0].final_latent.shape == (16, 8, 8)
    fill = runner.invoke(
        app, ["model", "tiny", "--family", "flux-fill", "--out", str(tmp_path / "f")]
    )
    assert fill.exit_code == 0 and family_of(str(tmp_path / "f")) == "flux"
    assert diffusers_engine(str(tmp_path / "f")).c.extra_channels == 80
    for args, named in (
        (["--family", "kandinsky", "--out", str(tmp_path / "k")], "--family"),
        (["--family", "zimage", "--out", str(tmp_path / "z")], "--out"),  # not empty
        (["--family", "zimage", "--out", str(tmp_path / "s"), "--size", "72"], "--size"),
    ):
        bad = runner.invoke(app, ["model", "tiny", *args])
        assert bad.exit_code == 2 and named in bad.output, bad.output
