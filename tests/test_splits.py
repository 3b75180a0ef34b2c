"""Tune and held-out splits share nothing, and a seed picks a different run of fixed data."""

from pathlib import Path

import numpy as np
import pytest

from promptserve.errors import InputError
from promptserve.workload import generate_arrivals, parse_arrival_spec
from promptserve.workload.arrivals import read_trace_offsets, trace_arrivals
from promptserve.workload.splits import phase, prompt_order, trace_window

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "data/AzureLLMInferenceTrace_conv.csv"


def test_the_prompt_halves_are_disjoint_and_a_seed_rotates_within_its_half():
    tune = {s: prompt_order(3999, "tune", s) for s in (1, 2, 3)}
    held = {s: prompt_order(3999, "held-out", s) for s in (1, 2, 3)}
    for s in (1, 2, 3):
        assert not set(tune[s]) & set(held[s])
        assert set(tune[s]) == set(range(1999)) and set(held[s]) == set(range(1999, 3999))
        # rotated, so neighbouring lines (what the cache feeds on) stay neighbours
        assert np.all(np.diff(held[s]) % 2000 == 1)
    assert len({int(held[s][0]) for s in (1, 2, 3)}) == 3  # three different starts
    assert list(prompt_order(10, "all", 0)) == list(range(10))  # seed 0: the file's own order
    with pytest.raises(InputError, match="too few"):
        prompt_order(1, "tune", 1)


def test_on_a_trace_each_seed_replays_a_different_window_of_its_half():
    spec = parse_arrival_spec(f"trace:{TRACE}")
    runs = {
        (split, s): generate_arrivals(spec, rate_qpm=60, minutes=20, seed=s, split=split)
        for split in ("tune", "held-out")
        for s in (1, 2, 3)
    }
    for times in runs.values():
        assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 20 * 60
        assert 0.5 < len(times) / (20 * 60) < 2.0  # about the rate asked (bursts aside)
    gaps = {k: np.diff(v)[:200] for k, v in runs.items()}
    keys = list(gaps)
    for i, a in enumerate(keys):  # no two runs are the same arrivals, up to a shift
        for b in keys[i + 1 :]:
            n = min(len(gaps[a]), len(gaps[b]))
            assert not np.allclose(gaps[a][:n], gaps[b][:n]), (a, b)


def test_seed_zero_replays_the_trace_from_its_start_and_a_phase_rotates_it():
    offsets = read_trace_offsets(TRACE)
    whole = trace_arrivals(offsets, 60, None)
    assert np.allclose(trace_arrivals(offsets, 60, None, phase(0)), whole)
    half = trace_arrivals(offsets, 60, None, 0.5)
    assert len(half) == len(whole) and half[0] == 0
    cut = len(offsets) // 2
    assert np.allclose(np.diff(half)[:100], np.diff(whole)[cut : cut + 100])
    with pytest.raises(InputError, match="phase"):
        trace_arrivals(offsets, 60, None, 1.0)
    assert trace_window(offsets, "held-out")[0] == 0
    assert len(trace_window(offsets, "tune")) + len(trace_window(offsets, "held-out")) == len(
        offsets
    )


def test_a_held_out_poisson_run_never_draws_a_tune_run():
    spec = parse_arrival_spec("poisson")
    tune = generate_arrivals(spec, rate_qpm=60, minutes=5, seed=1, split="tune")
    held = generate_arrivals(spec, rate_qpm=60, minutes=5, seed=1, split="held-out")
    assert not np.array_equal(tune, held)
    assert np.array_equal(tune, generate_arrivals(spec, rate_qpm=60, minutes=5, seed=1))
