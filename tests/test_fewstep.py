"""Few-step schedules (issue 53): a UNet checkpoint that ships Euler with trailing spacing (the
few-step distillations') runs on it, equal to its pipeline; ``--steps`` sets the schedule and
the levels follow it."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from promptserve.engine import make_engine
from promptserve.engine.base import GenerationItem
from promptserve.engine.denoise import DDIMStepper, denoise
from promptserve.engine.diffusers_backend import diffusers_engine, levels_for
from promptserve.engine.euler import EulerStepper, takes_euler
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.engine.steprunner import StepRunner
from promptserve.errors import InputError

STEPS = 4


def on_euler(c, spacing: str = "trailing"):  # noqa: ANN001, ANN201 - components
    config = {k: v for k, v in c.scheduler.config.items() if not k.startswith("_")}
    euler = EulerDiscreteScheduler.from_config({**config, "timestep_spacing": spacing})
    assert euler.config.timestep_spacing == spacing
    return dataclasses.replace(c, scheduler=euler, stepper_type=EulerStepper)


@pytest.mark.parametrize("family", ["tiny", "sdxl"])
def test_trailing_euler_equals_the_pipeline_guided_and_not(family):
    c = on_euler(build(family))
    assert takes_euler(c.scheduler) and isinstance(c.stepper(STEPS, 1.0), EulerStepper)
    for guidance in (7.5, 1.0):  # 1.0: the distillations' (the pipeline runs no negative pass)
        pipe = pipeline_for(c, guidance)
        noise = c.noise(3)
        ours, _ = denoise(c, noise, ["a red fox"], 0, STEPS, [], guidance)
        theirs = pipe(
            ["a red fox"], latents=noise / c.scheduler.init_noise_sigma, height=64, width=64,
            num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent",
        ).images  # fmt: skip
        scale = max(1.0, float(theirs.abs().max()))
        assert torch.abs(ours - theirs).max() <= 1e-5 * scale, guidance


def test_a_euler_run_resumes_at_k_and_its_members_equal_their_runs_alone():
    c = on_euler(build("tiny"))
    noise = c.noise(1)
    full, captured = denoise(c, noise, ["a lighthouse"], 0, STEPS, [1, 2])
    for k in (1, 2):
        resumed, _ = denoise(c, captured[k], ["a lighthouse"], k, STEPS, [])
        assert torch.abs(resumed - full).max() <= 1e-5 * max(1.0, float(full.abs().max()))
    items = [GenerationItem("a fox", 0, seed=1), GenerationItem("a boat", 0, seed=2)]
    alone = [denoise(c, c.noise(it.seed), [it.prompt], 0, STEPS, [])[0] for it in items]
    runner = StepRunner(c, STEPS, (0, 1, 2))
    runner.join([(0, items[0])])
    runner.step()
    runner.join([(1, items[1])])  # a step behind
    done = {}
    while runner.slots:
        done.update(runner.step())
    for i, latent in enumerate(alone):
        assert np.abs(done[i].final_latent - latent[0].numpy()).max() <= 1e-5 * 50


def test_a_saved_few_step_folder_keeps_its_euler_and_another_euler_runs_ddim(tmp_path):
    c = build("tiny")
    pipeline_for(on_euler(c), 1.0).save_pretrained(tmp_path / "lightning")
    engine = diffusers_engine(str(tmp_path / "lightning"), total_steps=STEPS)
    assert isinstance(engine.c.stepper(STEPS, 1.0), EulerStepper)
    assert engine.total_steps == STEPS and engine.levels == levels_for(STEPS) == (0, 1, 2)
    # SDXL base ships Euler with leading spacing: not a few-step one, it runs on DDIM
    pipeline_for(on_euler(c, "leading"), 7.5).save_pretrained(tmp_path / "base")
    engine = diffusers_engine(str(tmp_path / "base"))
    assert type(engine.c.stepper(50, 7.5)) is DDIMStepper and engine.total_steps == 50


def test_steps_sets_the_schedule_and_its_levels_and_the_modelled_backend_refuses_it():
    engine = make_engine("tiny", steps=8)
    assert engine.total_steps == 8 and engine.levels == (0, 1, 2, 3, 4)
    assert len(engine.generate([GenerationItem("a fox", 0, seed=1)])[0].latents) == 4
    with pytest.raises(InputError, match="--steps"):
        make_engine("tiny", backend="modeled", steps=4)


def test_a_schnell_shaped_flux_runs_four_steps_without_guidance_as_its_pipeline():
    """FLUX.1-schnell: no guidance input (the transformer has no guidance embedding), a fixed
    shift of 1, four steps; equal to ``FluxPipeline`` and resumable at K."""
    from promptserve.engine.flow import pack, unpack

    c = build("flux-schnell")
    assert c.guidance_spec.kind == "none"
    noise = c.noise(2)
    ours, captured = denoise(c, noise, ["a red fox"], 0, STEPS, [2], 0.0)
    theirs = pipeline_for(c, 0.0)(
        ["a red fox"], latents=pack(noise), num_inference_steps=STEPS, guidance_scale=0.0,
        output_type="latent", height=64, width=64, max_sequence_length=c.max_sequence_length,
    ).images  # fmt: skip
    theirs = unpack(theirs, 8, 8)
    assert torch.abs(ours - theirs).max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    resumed, _ = denoise(c, captured[2], ["a red fox"], 2, STEPS, [], 0.0)
    assert torch.abs(resumed - ours).max() <= 1e-5 * max(1.0, float(ours.abs().max()))


@pytest.mark.parametrize("latent_cache", [True, False])
def test_the_latent_cache_off_runs_every_step_and_writes_nothing(tmp_path, latent_cache):
    """``serve --latent-cache off`` (the README's advice where a few-step model's levels buy
    too little): a repeated prompt runs every step again and the cache stays empty; on, the
    same repeat resumes from the first."""
    from factories import client, tiny_app, until_cached
    from promptserve.loadgen import read_metric
    from promptserve.server.live import LiveServer

    app = tiny_app(tmp_path, steps=8, latent_cache=latent_cache, policy="continuous-ht")
    with LiveServer(app) as url:
        images = client(url).images
        first = images.generate(prompt="a lighthouse at dusk", size="64x64")
        if latent_cache:
            until_cached(url, 1)
        again = images.generate(prompt="a lighthouse at dusk", size="64x64")
        entries = read_metric(url, "promptserve_cache_entries")
        written = read_metric(url, "promptserve_cache_bytes")
    meta = [r.data[0].model_extra["promptserve"] for r in (first, again)]
    assert meta[0]["level_k"] == 0
    if latent_cache:
        assert meta[1]["cache_hit"] and meta[1]["level_k"] > 0 and entries >= 1
    else:
        assert not meta[1]["cache_hit"] and meta[1]["level_k"] == 0
        assert entries == 0 and written == 0
