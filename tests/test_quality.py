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
