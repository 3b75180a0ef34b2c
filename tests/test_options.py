"""Engine speed options: each changes how the denoiser runs, not what it computes."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from promptserve.cli import app
from promptserve.engine import make_engine
from promptserve.engine.base import GenerationItem
from promptserve.engine.options import EngineOptions, apply_options
from promptserve.errors import InputError
from test_engine import family_engine

ITEM = [GenerationItem("a harbour at night", 0, seed=3)]


@pytest.mark.parametrize(
    "options",
    [EngineOptions(attention="math"), EngineOptions(channels_last=True)],
    ids=lambda o: o.label(),
)
def test_an_option_leaves_the_image_as_it_was(options):
    plain = make_engine("tiny").generate(ITEM)[0]
    fast = make_engine("tiny", options=options)
    assert fast.c.unet is not make_engine("tiny").c.unet
    got = fast.generate(ITEM)[0]
    assert np.abs(got.final_latent - plain.final_latent).max() <= 1e-4
    assert set(got.latents) == set(plain.latents)


def test_a_compiled_transformer_gives_the_same_latents_in_the_step_runner_too():
    from promptserve.engine.steprunner import StepRunner

    engine = family_engine("flux")
    plain = engine.generate(ITEM)[0]
    comps = dataclasses.replace(engine.c)
    apply_options(comps, EngineOptions(compile=True))
    assert type(comps.transformer).__name__ == "OptimizedModule"
    runner = StepRunner(comps, engine.total_steps, engine.levels, engine.guidance)
    runner.join([("a", ITEM[0])])
    done = {}
    while "a" not in done:
        done.update(runner.step())
    assert np.abs(done["a"].final_latent - plain.final_latent).max() <= 1e-4


def test_options_that_cannot_apply_are_refused_by_name():
    with pytest.raises(InputError, match="cuda_graphs needs a CUDA device"):
        make_engine("tiny", options=EngineOptions(cuda_graphs=True))
    with pytest.raises(InputError, match="channels_last applies to UNet"):
        apply_options(family_engine("sd3").c, EngineOptions(channels_last=True))
    assert EngineOptions().label() == "plain"
    assert EngineOptions(compile=True, attention="math").label() == "compile+attention=math"


def test_serve_names_a_bad_engine_flag_and_an_unsupported_family(tmp_path):
    base = ["serve", "--embedder", "hashing", "--port", "18765", "--cache-dir", str(tmp_path)]
    res = CliRunner().invoke(app, [*base, "--dtype", "float64"])
    assert res.exit_code == 2 and "field dtype" in res.output
    res = CliRunner().invoke(app, [*base, "--attention", "flash"])
    assert res.exit_code == 2 and "field attention" in res.output
    res = CliRunner().invoke(app, [*base, "--cuda-graphs"])
    assert res.exit_code == 2 and "cuda_graphs needs a CUDA device" in res.output
    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    res = CliRunner().invoke(app, [*base, "--model", str(model)])
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and "KandinskyPipeline" in line and "does not serve" in line
