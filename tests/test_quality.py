import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptserve.cache.thresholds import shipped_thresholds
from promptserve.profile import reference_profile
from promptserve.quality import PUBLISHED_KOPT_MIX, calibrate, quality_model

PROFILE = reference_profile()
LEVELS = PROFILE.levels
MODELS = {s: quality_model(LEVELS, PROFILE.quality, s) for s in ("mild", "steep")}
shapes = st.sampled_from(sorted(MODELS))
levels = st.sampled_from(LEVELS)


@pytest.mark.parametrize("shape", sorted(MODELS))
def test_calibrated_to_published_clipper_ht(shape):
    assert MODELS[shape].mean_at(25, PUBLISHED_KOPT_MIX) == pytest.approx(89.7, abs=1e-9)


def test_presets_match_the_design_shapes():
    assert MODELS["mild"].per_level == pytest.approx(0.5, abs=0.05)
    assert MODELS["steep"].cap == pytest.approx(89.6, abs=0.05) and MODELS["steep"].cap < 90


@given(shapes, levels)
def test_full_generation_is_100(shape, k_opt):
    assert MODELS[shape].q(k_opt, 0) == 100


@given(shapes, levels, levels)
def test_tolerated_levels_get_published_quality(shape, k_opt, k):
    if k <= k_opt:
        assert MODELS[shape].q(k_opt, k) == PROFILE.level_quality(k)
    else:
        assert MODELS[shape].q(k_opt, k) < PROFILE.level_quality(k)


@given(shapes, levels, levels, levels)
def test_quality_never_rises_with_k_nor_falls_with_k_opt(shape, k_opt, k1, k2):
    m = MODELS[shape]
    lo, hi = sorted((k1, k2))
    assert m.q(k_opt, hi) <= m.q(k_opt, lo)
    assert m.q(lo, k_opt) <= m.q(hi, k_opt)


@given(shapes, st.floats(-1, 1), st.floats(-1, 1), levels)
def test_quality_never_falls_with_similarity(shape, s1, s2, k):
    t = shipped_thresholds("minilm")
    lo, hi = sorted((s1, s2))
    assert MODELS[shape].q(t.k_opt(lo), k) <= MODELS[shape].q(t.k_opt(hi), k)


def test_mild_penalty_grows_with_the_shortfall():
    m = MODELS["mild"]
    drops = [PROFILE.level_quality(25) - m.q(k_opt, 25) for k_opt in (20, 15, 10, 5, 0)]
    assert all(b > a > 0 for a, b in zip(drops, drops[1:]))


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="not 'mild' or 'steep'"):
        calibrate(LEVELS, PROFILE.quality, "harsh")  # type: ignore[arg-type]


def test_the_feature_cache_interval_costs_quality_by_its_cached_share_and_composes_with_k():
    from promptserve.cachedstep import REFERENCE_CACHED_STEP_SHARE
    from promptserve.errors import InputError
    from promptserve.profile import reference_profile, with_feature_cache
    from promptserve.quality import interval_quality

    mild, steep = interval_quality("mild"), interval_quality("steep")
    assert mild.q_r(1) == steep.q_r(1) == 100.0  # every step full: today's computation
    loss = {s: [100 - m.q_r(r) for r in range(1, 9)] for s, m in (("mild", mild), ("steep", steep))}
    # mild: linear in the cached share, so each longer interval adds less and it saturates
    steps_mild = np.diff(loss["mild"])
    assert np.all(steps_mild > 0) and np.all(np.diff(steps_mild) < 0)
    assert loss["mild"][-1] < mild.loss_per_share
    # steep: each cached step in a run costs as much as the last, so past r = 3 it grows faster
    # than a share-linear loss through the same r = 3 point
    assert np.allclose(np.diff(loss["steep"]), loss["steep"][1])
    share_linear = [loss["steep"][2] * ((r - 1) / r) / (2 / 3) for r in range(1, 9)]
    assert all(loss["steep"][r - 1] > share_linear[r - 1] for r in range(4, 9))
    assert all(steep.q_r(r) < mild.q_r(r) for r in (2, 3, 4, 5))
    assert mild.combined(91.52, 3) == pytest.approx(91.52 * mild.q_r(3) / 100)
    with pytest.raises(ValueError, match=">= 1"):
        mild.q_r(0)
    ref = reference_profile()
    assert ref.interval_cost(3) == 1.0  # no feature cache in the profile: every step full
    fifth = with_feature_cache(ref, share=0.2)  # a cached step at a fifth of a full one
    assert fifth.interval_cost(3) == pytest.approx(1.4 / 3)  # one full and two cached of 3
    assert fifth.interval_cost(4) == pytest.approx(1.6 / 4)
    cached = with_feature_cache(ref)
    assert cached.interval_cost(1) == 1.0 and cached.interval_cost(5) < cached.interval_cost(3)
    for bad in (0.0, 1.0):
        with pytest.raises(InputError, match="share of a full step"):
            with_feature_cache(ref, share=bad)
    # each family's share gives back the speedup its source reports at the source's interval
    from promptserve.cachedstep import CACHED_STEP_SHARES

    for family, src in CACHED_STEP_SHARES.items():
        faster = with_feature_cache(ref, share=src.share, r_max=64 - 1)
        speedup = 1 / ((1 + (src.interval - 1) * faster.cached_step_share) / src.interval)
        assert speedup == pytest.approx(src.speedup), family
        assert 0 < src.share < 1 and src.source
    assert CACHED_STEP_SHARES["sdxl"].share == REFERENCE_CACHED_STEP_SHARE
