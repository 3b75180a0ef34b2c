"""Feature caching (DeepCache) per member: the UNet's own forward at a full step, a cheaper
cached step between, and a member's image the same alone and beside members on other
intervals and phases."""

import numpy as np
import pytest
import torch

from factories import staggered
from promptserve.engine.base import GenerationItem
from promptserve.engine.denoise import encode, time_ids
from promptserve.engine.featurecache import is_full_step, unet_forward
from promptserve.engine.shapes import build
from test_engine import family_engine


@pytest.mark.parametrize("family", ["tiny", "sdxl"])
def test_the_full_step_is_the_unet_s_own_forward_bit_for_bit(family):
    c = build(family)
    x = torch.randn(4, *c.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900, 500, 500])
    context, extra = encode(c, ["a", "b", "c", "d"])
    kwargs = None
    if extra:
        kwargs = {
            "text_embeds": extra["text_embeds"],
            "time_ids": time_ids([c.native] * 4, "cpu", context.dtype),
        }
    with torch.no_grad():
        ref = c.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=kwargs).sample
        out, deep = unet_forward(c.unet, x, t, context, kwargs)
        assert torch.equal(out, ref)
        # a cached step on the deep feature of the same step is the full step again
        again, _ = unet_forward(c.unet, x, t, context, kwargs, deep=deep)
        assert torch.equal(again, ref)
        later, _ = unet_forward(c.unet, x, t - 50, context, kwargs, deep=deep)
        assert not torch.equal(later, ref)


def test_a_member_at_an_interval_approximates_the_full_run():
    engine = family_engine("tiny", steps=12, levels=(0, 4))
    full = engine.generate([GenerationItem("a lighthouse", seed=1)])[0]
    cached = engine.generate([GenerationItem("a lighthouse", seed=1, interval=3)])[0]
    diff = np.abs(cached.final_latent - full.final_latent).max()
    assert 1e-4 < diff < 0.5 * np.abs(full.final_latent).max()  # cheaper, and near it
    assert [is_full_step(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("family", ["tiny", "sd3", "flux", "qwenimage", "zimage"])
def test_a_member_is_the_same_alone_and_beside_other_intervals_and_phases(family):
    engine = family_engine(family, steps=12, levels=(0, 4))
    items = [
        GenerationItem("a harbour", seed=2, interval=3),
        GenerationItem("a harbour", seed=2),
        GenerationItem("a kite", seed=3, interval=2),
    ]
    alone = [engine.generate([item])[0] for item in items]
    done = staggered(engine, items)  # item 2's full steps fall between item 0's
    for key, solo in enumerate(alone):
        assert np.abs(done[key].final_latent - solo.final_latent).max() <= 1e-4, key
    assert set(done[0].latents) == {4}  # captured at its level as any member
    assert np.abs(done[0].final_latent - done[1].final_latent).max() > 1e-4  # same seed, r=3


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_block_caching_runs_the_model_s_own_blocks_at_a_full_step(family):
    """The wrappers are transparent at a full step (bit for bit), and a cached step on the
    residual of the same step gives the full step back; the model's forward is its own."""
    engine = family_engine(family, steps=6, levels=(0, 2))
    item = GenerationItem("a lantern", seed=4)
    before = engine.generate([item])[0]
    kernel = engine.step_runner().kernel
    rows = kernel.encode(["a lantern"])
    x = engine.c.noise(4)
    steps = torch.tensor([1])
    plain = kernel.advance(x, steps, rows)[0]
    full, _, feature = kernel.advance_features(x, steps, rows, None)
    assert torch.equal(full, plain) and engine.c.block_cache.mode is None
    again, _, _ = kernel.advance_features(x, steps, rows, feature)
    assert torch.abs(again - plain).max() <= 1e-5
    after = engine.generate([item])[0]  # the wrappers stay installed: still the same run
    assert np.array_equal(before.final_latent, after.final_latent)


def test_a_running_member_re_intervalled_runs_a_full_step_then_the_new_interval():
    """A burst raises a running member's interval (``StepRunner.reinterval``): at r = 1 it
    has no deep feature yet, so its next step is full; then a full step every new interval.
    Its twin left at r = 1 ends elsewhere; an unknown key is refused."""
    runner = family_engine("tiny", steps=12, levels=(0, 4)).step_runner()
    calls: list[tuple[int, bool]] = []  # (members, cached) per denoiser call on features
    inner = runner.kernel.advance_features

    def counted(latents, steps, rows, feature):
        calls.append((len(latents) // 2, feature is not None))
        return inner(latents, steps, rows, feature)

    runner.kernel.advance_features = counted
    runner.join(
        [("a", GenerationItem("a harbour", seed=2)), ("b", GenerationItem("a harbour", seed=2))]
    )
    for _ in range(4):
        runner.step()
    assert calls == []  # every step full: the plain call
    assert runner.reinterval("a", 3) and not runner.reinterval("nobody", 3)
    done = {}
    while runner.slots:
        done.update(runner.step())
    # steps 4..11 of "a": full, cached, cached, full, cached, cached, full, cached
    assert [cached for _, cached in calls] == [False, True, True, False, True, True, False, True]
    assert np.abs(done["a"].final_latent - done["b"].final_latent).max() > 1e-4


@pytest.mark.parametrize("family", ["qwenimage", "zimage"])
def test_guided_members_cache_both_passes_and_equal_their_runs_alone(family):
    """Qwen-Image's and Z-Image's guided members run a negative pass the unguided ones do not:
    each keeps a residual per pass, so a guided member on an interval is the same alone and
    beside unguided members on other intervals and phases."""
    from promptserve.engine.base import Look

    engine = family_engine(family, steps=12, levels=(0, 4))
    plain = Look(guidance=0.0) if family == "zimage" else Look()  # Z-Image: scale 0 unguided
    items = [
        GenerationItem("a harbour", seed=2, interval=3, look=Look(negative_prompt="fog")),
        GenerationItem("a harbour", seed=2, interval=2, look=plain),
        GenerationItem("a kite at dusk", seed=3, interval=3, look=Look(negative_prompt="rain")),
        GenerationItem("a kite", seed=4, look=plain),
    ]
    alone = [engine.generate([item])[0] for item in items]
    done = staggered(engine, items)
    for key, solo in enumerate(alone):
        assert np.abs(done[key].final_latent - solo.final_latent).max() <= 1e-4, key
    plain = engine.generate([GenerationItem("a harbour", seed=2, look=items[0].look)])[0]
    assert np.abs(plain.final_latent - alone[0].final_latent).max() > 1e-4  # r = 3 differs


def test_a_kontext_edit_on_an_interval_is_the_same_alone_and_beside_generations():
    """Flux Kontext's instruction edits carry their image's tokens through block reuse: one on
    an interval is the same alone and beside a generation on another interval."""
    from promptserve.engine.base import EditInput
    from promptserve.engine.tiny import DenoisingEngine

    engine = DenoisingEngine(build("flux-kontext"), "tiny-kontext", 12, (0, 4), 3.5)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    items = [
        GenerationItem("make it red", seed=1, interval=3, edit=EditInput(image, 0.6)),
        GenerationItem("a fox", seed=2, interval=2),
        GenerationItem("make it blue", seed=3, edit=EditInput(image, 0.6)),
    ]
    alone = [engine.generate([item])[0] for item in items]
    done = staggered(engine, items)
    for key, solo in enumerate(alone):
        assert np.abs(done[key].final_latent - solo.final_latent).max() <= 1e-4, key
    full = engine.generate([GenerationItem("make it red", seed=1, edit=EditInput(image, 0.6))])
    assert np.abs(full[0].final_latent - alone[0].final_latent).max() > 1e-4  # r = 3 differs
