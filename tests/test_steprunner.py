"""The step runner: a request inside a changing mixed batch equals its solo run."""

import dataclasses

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


@pytest.mark.parametrize(
    "make",
    [tiny_engine, lambda: family_engine("flux"), lambda: family_engine("tiny-inpaint"),
     lambda: family_engine("flux-fill")],
    ids=["sd", "flux", "sd-inpainting-unet", "flux-fill"],
)  # fmt: skip
def test_edits_join_a_running_batch_each_at_its_own_start_and_equal_their_solo_runs(make):
    """An image-to-image member and an inpainting one (``engine.edits``) join generations
    mid-run, each at the step its strength gives: every final latent equals its run alone.
    On a model with mask channels (an inpainting UNet, Flux Fill) the inpainting member's go
    beside its latent, the others' are the plain ones."""
    from PIL import Image

    from promptserve.engine.base import EditInput
    from promptserve.engine.denoise import denoise
    from promptserve.engine.edits import edit_start, start_step

    engine = make()
    c, n = engine.c, engine.total_steps
    w, h = c.native
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : 3 * h // 4, : w // 2] = 255
    gen = GenerationItem("a lighthouse at dusk", 0, seed=1)
    i2i = GenerationItem("a lighthouse, oil", seed=4, edit=EditInput(image, 0.6))
    inp = GenerationItem("a red door", seed=5, edit=EditInput(image, 0.8, mask))

    def alone(item: GenerationItem) -> np.ndarray:
        if item.edit is None:
            return engine.generate([item])[0].final_latent
        m = Image.fromarray(item.edit.mask) if item.edit.mask is not None else None
        k, start, member = edit_start(
            c, Image.fromarray(image), item.edit.strength, item.seed, n, m
        )
        out, _ = denoise(c, start, [item.prompt], k, n, [], engine.guidance, inpaint=[member])
        return out[0].float().numpy()

    runner = StepRunner(c, n, engine.levels, engine.guidance)
    runner.join([("gen", gen)])
    runner.step()
    runner.join([("i2i", i2i), ("inp", inp)])
    steps = runner.steps_left()
    assert steps["i2i"] == n - start_step(n, 0.6, c.family)  # each at its own start
    assert steps["inp"] == n - start_step(n, 0.8, c.family) > steps["i2i"]
    done = run_until(runner, ["gen", "i2i", "inp"])
    for key, item in (("gen", gen), ("i2i", i2i), ("inp", inp)):
        assert np.abs(done[key].final_latent - alone(item)).max() < TOL, key
        assert done[key].latents == {} or item.edit is None  # an edit writes no cache level
    assert done["i2i"].k == n - steps["i2i"] and done["inp"].k == n - steps["inp"]
    # the batch runner too: the three in one call of generate, each as alone
    batch = engine.generate([gen, i2i, inp])
    for res, item in zip(batch, (gen, i2i, inp), strict=True):
        assert np.abs(res.final_latent - alone(item)).max() < TOL
    assert batch[2].k == start_step(n, 0.8, c.family) and batch[2].latents == {}


@pytest.mark.parametrize("make", [tiny_engine, lambda: family_engine("flux")], ids=["sd", "flux"])
def test_a_paused_member_resumed_on_another_runner_ends_in_the_same_bytes(make):
    """Background work (``StepRunner.pause``): a member written down between two steps and
    joined again later, on another GPU's runner and beside other members, ends in the bytes of
    its run without the pause, with the same cache levels captured; an inpainting edit too;
    and so does the batch runner going on from it.
    Beside other members before and after, its latents are its run's within the tolerance a
    mixed batch keeps (a batch of another size may round differently)."""
    import pickle

    from promptserve.engine.base import EditInput

    engine = make()
    c, n = engine.c, engine.total_steps
    w, h = c.native
    image = np.random.default_rng(7).integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[: h // 2] = 255
    gen = GenerationItem("a lighthouse at dusk", 0, seed=11)
    inp = GenerationItem("a red door", seed=12, edit=EditInput(image, 0.8, mask))

    def uninterrupted(item):
        runner = StepRunner(c, n, engine.levels, engine.guidance)
        runner.join([("x", item)])
        return run_until(runner, ["x"])["x"]

    for item, beside in ((gen, False), (inp, False), (gen, True)):
        whole = uninterrupted(item)
        first = StepRunner(c, n, engine.levels, engine.guidance)
        first.join([("x", item)] + [("other", GenerationItem("a fox", 0, seed=2))] * beside)
        for _ in range(3):
            first.step()
        paused = first.pause("x")
        assert paused is not None and first.pause("x") is None and len(first) == beside
        paused = pickle.loads(pickle.dumps(paused))  # as it travels to a store or a replica
        second = StepRunner(c, n, engine.levels, engine.guidance)  # another GPU's worker
        if beside:
            second.join([("y", GenerationItem("a fox", 0, seed=3))])
            second.step()
        second.join([("x", dataclasses.replace(item, resume=paused))])
        assert second.steps_left()["x"] == whole_steps(item, n) - 3
        again = run_until(second, ["x"])["x"]
        if not beside:
            assert again.png == whole.png  # the same bytes
            # the batch runner (a pinned GPU's) goes on from the same state to the same bytes
            batch = engine.generate([dataclasses.replace(item, resume=paused)])[0]
            assert batch.png == whole.png and set(batch.latents) == set(whole.latents)
        assert np.abs(again.final_latent - whole.final_latent).max() <= TOL
        assert set(again.latents) == set(whole.latents)
        for level, latent in whole.latents.items():
            assert np.abs(again.latents[level] - latent).max() <= TOL


def whole_steps(item, n):
    from promptserve.strength import start_step

    return n if item.edit is None else n - start_step(n, item.edit.strength, "unet")


def test_a_resume_into_another_dtype_or_past_the_last_step_is_refused():
    from promptserve.engine.base import Paused

    engine = tiny_engine()
    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    latent = np.zeros((4, 8, 8), np.float32)
    for paused, says in [
        (Paused(3, latent, "torch.bfloat16"), "cannot resume in"),
        (Paused(engine.total_steps, latent, str(engine.c.dtype)), "paused at step"),
    ]:
        with pytest.raises(ValueError, match=says):
            runner.join([("x", GenerationItem("a", resume=paused))])
