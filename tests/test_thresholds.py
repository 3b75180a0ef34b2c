import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptserve.cache.thresholds import (
    Thresholds,
    kopt_mix,
    load_thresholds,
    read_pairs,
    refit_from_pairs,
    shipped_thresholds,
)
from promptserve.errors import InputError

CLIP = shipped_thresholds("clip")
MINILM = shipped_thresholds("minilm")


def test_shipped_tables_carry_the_published_and_mapped_thresholds():
    """The CLIP table is the reference profile's own; the MiniLM one is that table carried
    through the isotonic map fitted in data/ (its last threshold, below the logged pairs,
    extrapolated under the one before)."""
    import json

    from promptserve.paths import data_file
    from promptserve.profile import reference_profile

    raw = json.loads(data_file("reference_profile_sdxl.json").read_text())
    text = json.dumps(raw)
    for s in CLIP.min_similarity:  # each published threshold appears in the reference file
        assert f"{s}" in text or f"{s:.2f}" in text, s
    mapped = json.loads(data_file("embedder_threshold_map.json").read_text())
    iso = mapped["clip_threshold_to_minilm"]["isotonic_regression"]
    for clip_s, minilm_s in zip(CLIP.min_similarity, MINILM.min_similarity, strict=True):
        fitted = iso[f"{clip_s:.2f}"]
        assert fitted is None or minilm_s == pytest.approx(fitted)
    assert CLIP.levels == MINILM.levels == tuple(sorted(reference_profile().levels[1:])[::-1])
    assert list(MINILM.min_similarity) == sorted(MINILM.min_similarity, reverse=True)


@pytest.mark.parametrize(
    ("s", "k"), [(None, 0), (1.0, 25), (0.95, 25), (0.9499, 20), (0.80, 10), (0.65, 5), (0.6, 0)]
)
def test_k_opt_is_the_largest_k_whose_threshold_is_met(s, k):
    assert CLIP.k_opt(s) == k


@given(st.lists(st.floats(-1, 1) | st.just(float("nan")), max_size=50))
def test_vectorised_k_opt_agrees(sims):
    arr = np.array(sims, dtype=np.float32)
    expected = [CLIP.k_opt(None if np.isnan(s) else float(s)) for s in arr]
    assert CLIP.k_opt_many(arr).tolist() == expected


def test_refit_recovers_a_known_monotone_map():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, 4000)
    y = np.sqrt(x)  # the reference similarity is a monotone function of ours
    fitted = refit_from_pairs(x, y, CLIP, "ours")
    expected = [0.95**2, 0.90**2, 0.85**2, 0.75**2, 0.65**2]
    assert fitted.min_similarity == pytest.approx(expected, abs=0.01)
    assert fitted.levels == CLIP.levels


def test_refit_extrapolates_what_the_pairs_never_reach():
    x = np.linspace(0.5, 1.0, 200)
    y = 0.7 + 0.3 * (x - 0.5) / 0.5  # reference from 0.70 to 1.0: 0.65 is never reached
    fitted = refit_from_pairs(x, y, CLIP, "ours")
    assert "K=5 extrapolated" in fitted.provenance
    assert fitted.min_similarity[-1] < fitted.min_similarity[-2]


def test_threshold_file_round_trip_and_errors(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(MINILM.to_json()))
    assert load_thresholds(str(f)) == MINILM
    f.write_text(
        json.dumps(
            {
                "embedder": "x",
                "levels": [{"K": 5, "min_similarity": 0.9}, {"K": 10, "min_similarity": 0.5}],
            }
        )
    )
    with pytest.raises(InputError, match="must not rise"):
        load_thresholds(str(f))
    with pytest.raises(InputError, match="no shipped thresholds"):
        load_thresholds("word2vec")


def test_pairs_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,neighbour,reference_similarity\na,b,0.5\nc,d,high\n")
    with pytest.raises(InputError, match=":3: reference_similarity 'high'"):
        read_pairs(f)
    f.write_text("prompt,reference_similarity\na,0.5\n")
    with pytest.raises(InputError, match="lacks column"):
        read_pairs(f)


def test_kopt_mix_sums_to_one():
    mix = kopt_mix([0, 5, 5, 25], (0, 5, 10, 15, 20, 25))
    assert mix == {0: 0.25, 5: 0.5, 10: 0.0, 15: 0.0, 20: 0.0, 25: 0.25}


def test_thresholds_dataclass_orders_descending():
    t = Thresholds("x", (10, 5), (0.8, 0.5))
    assert t.k_opt(0.7) == 5 and t.k_opt(0.85) == 10
