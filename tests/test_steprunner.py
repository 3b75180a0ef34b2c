"""The step runner: a request inside a changing mixed batch equals its solo run."""

import numpy as np
import pytest

from promptserve.engine.base import GenerationItem
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import tiny_engine
from test_engine import family_engine, tiny_xl_engine

TOL = 1e-4  # float32 on the CPU


def run_until(runner, keys):
    out = {}
    while not set(keys) <= set(out):
        for key, result in runner.step():
            out[key] = result
    return out


@pytest.mark.parametrize(
    "make",
    [tiny_engine, tiny_xl_engine, lambda: family_engine("sd3"), lambda: family_engine("flux")],
    ids=["sd", "sdxl", "sd3", "flux"],
)
def test_members_at_different_steps_match_their_solo_runs(make):
    engine = make()
    top = engine.levels[-1]
    a = GenerationItem("a lighthouse at dusk", 0, seed=1)
    b = GenerationItem("a fox in the snow", 0, seed=2)
    solo_a, solo_b = engine.generate([a])[0], engine.generate([b])[0]
    c = GenerationItem("a fox in the snow, oil", top, solo_b.latents[top], seed=3)
    solo_c = engine.generate([c])[0]

    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    runner.join([("a", a)])
    for _ in range(3):
        assert runner.step() == []
    runner.join([("b", b), ("c", c)])  # b from noise at step 0, c from a cached latent at K
    assert sorted(runner.steps_left().values()) == sorted(
        [engine.total_steps - 3, engine.total_steps, engine.total_steps - top]
    )
    out = run_until(runner, ["a", "b", "c"])
    assert len(runner) == 0
    for key, solo in (("a", solo_a), ("b", solo_b), ("c", solo_c)):
        got = out[key]
        assert np.abs(got.final_latent - solo.final_latent).max() <= TOL, key
        assert set(got.latents) == set(solo.latents), key  # captured at the same levels
        for level, latent in solo.latents.items():
            assert np.abs(got.latents[level] - latent).max() <= TOL, (key, level)
        assert got.k == solo.k
    # and the batch really mixed steps: the three did not finish together
    assert np.abs(out["a"].final_latent - out["b"].final_latent).max() > 1e-3


def test_cancelling_a_member_frees_its_slot_and_spares_the_others():
    engine = tiny_engine()
    a = GenerationItem("a red kite", 0, seed=4)
    solo = engine.generate([a])[0]
    runner = StepRunner(engine.c, engine.total_steps, engine.levels)
    runner.join([("a", a), ("x", GenerationItem("a blue kite", 0, seed=5))])
    runner.step()
    assert runner.cancel("x") and len(runner) == 1
    assert not runner.cancel("x")
    out = run_until(runner, ["a"])
    assert np.abs(out["a"].final_latent - solo.final_latent).max() <= TOL


def test_bad_joins_are_refused_with_the_reason():
    engine = tiny_engine()
    runner = StepRunner(engine.c, engine.total_steps, engine.levels)
    with pytest.raises(ValueError, match="needs a start latent"):
        runner.join([("a", GenerationItem("p", engine.levels[1]))])
    with pytest.raises(ValueError, match="not one of"):
        runner.join([("a", GenerationItem("p", 3))])
    assert len(runner) == 0
