import json

import pytest

from promptserve.errors import InputError
from promptserve.profile import load_profile, reference_profile

REF_T = [14.29, 15.87, 17.86, 20.41, 23.81, 28.57]


def test_reference_profile_matches_published_unbatched_throughput():
    p = reference_profile()
    assert p.levels == (0, 5, 10, 15, 20, 25) and p.total_steps == 50
    for k, t in zip(p.levels, REF_T, strict=True):
        assert p.throughput_qpm(k, 1) == pytest.approx(t)
        assert p.batch_latency(k, 1) == pytest.approx(60 / t)


def test_reference_batching_gives_the_published_factor_at_batch_8():
    p = reference_profile()
    for k in p.levels:
        assert p.throughput_qpm(k, 8) / p.throughput_qpm(k, 1) == pytest.approx(1.65)


def test_latency_grows_with_batch_and_falls_with_k():
    p = reference_profile()
    for k in p.levels:
        lat = [p.batch_latency(k, b) for b in range(1, p.max_batch + 1)]
        thr = [p.throughput_qpm(k, b) for b in range(1, p.max_batch + 1)]
        assert all(b > a for a, b in zip(lat, lat[1:]))
        assert all(b >= a for a, b in zip(thr, thr[1:]))
    for b in (1, 3, 8):
        lats = [p.batch_latency(k, b) for k in p.levels]
        assert all(y < x for x, y in zip(lats, lats[1:]))


def _measured(**over):
    raw = {
        "format": "promptserve-profile/1",
        "model": "tiny",
        "device": "cpu",
        "total_steps": 20,
        "levels": [0, 10],
        "batch_sizes": [1, 4],
        "batch_latency_s": [[1.0, 2.5], [0.5, 1.3]],
        "quality_percent": [100, 90],
    }
    raw.update(over)
    return raw


def test_measured_profile_loads_and_interpolates(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(_measured()))
    p = load_profile(f)
    assert p.name == "tiny@cpu" and p.levels == (0, 10)
    assert p.batch_latency(0, 2) == pytest.approx(1.5)
    assert p.batch_latency(10, 4) == pytest.approx(1.3)
    assert p.level_quality(10) == 90
    with pytest.raises(ValueError):
        p.batch_latency(0, 5)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"format": "v0"}, "field format"),
        ({"levels": [5, 10]}, "levels must start at 0"),
        ({"batch_latency_s": [[1.0], [0.5, 1.3]]}, "one row per level"),
        ({"batch_latency_s": [[1.0, -2], [0.5, 1.3]]}, "> 0 seconds"),
        ({"total_steps": "many"}, "field total_steps"),
        ({"levels": [0, 7], "quality_percent": None}, "quality_percent is required"),
    ],
)
def test_bad_measured_profiles_name_the_field(tmp_path, over, needle):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(_measured(**over)))
    with pytest.raises(InputError, match=needle):
        load_profile(f)


def test_profile_that_is_not_json(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile(f)


def test_measured_step_costs_interpolate_between_the_counts_measured(tmp_path):
    from promptserve.profile import load_profile
    from promptserve.steptime import step_profile

    raw = {
        "format": "promptserve-profile/1",
        "model": "m",
        "total_steps": 20,
        "levels": [0, 10],
        "batch_sizes": [1],
        "batch_latency_s": [[2.0], [1.0]],
        "quality_percent": [100, 90],
        "step": {
            "inflight": [1, 4],
            "step_latency_s": [0.1, 0.4],
            "encode_s": 0.02,
            "decode_s": 0.05,
        },
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    steps = step_profile(load_profile(path))
    assert steps.step_s == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert (steps.join_s, steps.leave_s) == (0.02, 0.05)
    raw["step"]["inflight"] = [2, 4]
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="step.*inflight must start at 1"):
        load_profile(path)
