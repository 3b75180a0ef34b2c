import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from promptserve.engine import GenerationItem, make_engine
from promptserve.engine.modeled import ModeledEngine
from promptserve.errors import InputError
from promptserve.profile import reference_profile
from promptserve.steptime import kind


@pytest.fixture(scope="module")
def engine():
    return make_engine("tiny")


@pytest.fixture(scope="module")
def full_run(engine):
    return engine.generate([GenerationItem("a red fox in the snow", 0, seed=7)])[0]


def test_full_run_captures_every_cache_level(engine, full_run):
    assert sorted(full_run.latents) == [k for k in engine.levels if k > 0]
    assert full_run.placeholder  # the tiny model's images are noise and say so
    img = Image.open(io.BytesIO(full_run.png))
    assert img.size == (64, 64) and img.format == "PNG"


@pytest.mark.parametrize("k", [2, 6, 10])
def test_resuming_from_its_own_latent_reproduces_the_full_run(engine, full_run, k):
    resumed = engine.generate([GenerationItem("a red fox in the snow", k, full_run.latents[k])])[0]
    assert np.abs(resumed.final_latent - full_run.final_latent).max() <= 1e-5
    assert sorted(resumed.latents) == [lv for lv in engine.levels if lv > k]


def test_a_mixed_batch_equals_the_requests_run_one_by_one(engine, full_run):
    items = [
        GenerationItem("a red fox in the snow", 0, seed=7),
        GenerationItem("a blue cat on a roof", 4, full_run.latents[4]),
        GenerationItem("a red fox in the rain", 4, full_run.latents[4]),
        GenerationItem("castle", 0, seed=1),
    ]
    together = engine.generate(items)
    for item, got in zip(items, together):
        alone = engine.generate([item])[0]
        assert got.k == item.k
        assert np.abs(got.final_latent - alone.final_latent).max() <= 1e-4


def test_resuming_from_another_prompts_latent_gives_a_valid_image(engine, full_run):
    res = engine.generate([GenerationItem("a lighthouse at dusk", 6, full_run.latents[6])])[0]
    assert np.isfinite(res.final_latent).all()
    assert np.abs(res.final_latent - full_run.final_latent).max() > 1e-3  # the new prompt steers it
    assert Image.open(io.BytesIO(res.png)).size == (64, 64)


def test_levels_above_zero_need_a_start_latent(engine):
    with pytest.raises(ValueError, match="needs a start latent"):
        engine.generate([GenerationItem("x", 4)])
    with pytest.raises(ValueError, match="not one of"):
        engine.generate([GenerationItem("x", 3, np.zeros((4, 8, 8), np.float32))])


def test_modeled_engine_waits_the_profile_latency():
    slept = []
    profile = reference_profile()
    eng = ModeledEngine(profile, sleep=slept.append)
    out = eng.generate(
        [GenerationItem("a", 25, None), GenerationItem("b", 25, None), GenerationItem("c", 0)]
    )
    assert slept == [profile.batch_latency(0, 1), profile.batch_latency(25, 2)]
    assert all(r.placeholder and r.png.startswith(b"\x89PNG") for r in out)


def test_unknown_backend_and_missing_model():
    with pytest.raises(InputError, match="backend 'onnx'"):
        make_engine("tiny", backend="onnx")
    with pytest.raises(InputError, match="not found.*nothing is downloaded"):
        make_engine("/no/such/model/folder")


def test_profile_command_writes_a_profile_the_simulator_loads(tmp_path):
    from typer.testing import CliRunner

    from factories import measured_profile
    from promptserve.cli import app

    out = tmp_path / "tiny.json"
    prof = measured_profile(out, "--levels", "0,10", "--batch-sizes", "1,2")
    assert prof.levels == (0, 10) and prof.batch_sizes == (1, 2) and prof.total_steps == 20
    # measured, not copied: every point timed and positive (speed is for bench_engine.py, as
    # a shared machine makes any comparison of two timings here flaky)
    assert all(t > 0 for row in prof.latency_s for t in row)
    assert len({t for row in prof.latency_s for t in row}) == 4
    assert prof.level_quality(10) == reference_profile().level_quality(25)
    # the step-level costs are measured too, and step-level serving plans with them
    from promptserve.steptime import derived_step_profile, step_profile

    written = json.loads(out.read_text())["step"]
    assert written["inflight"] == [1, 2] and all(v > 0 for v in written["step_latency_s"])
    assert written["encode_s"] > 0 and written["decode_s"] > 0
    steps = step_profile(prof)
    assert steps.step_s == tuple(written["step_latency_s"])
    assert (steps.join_s, steps.leave_s) == (written["encode_s"], written["decode_s"])
    assert steps != derived_step_profile(prof)
    # feature caching: a step of members all on cached steps, timed at each count, planned with
    cached = written["cached_step_latency_s"]
    assert len(cached) == 2 and all(v > 0 for v in cached)
    assert prof.cached_step_share == pytest.approx(cached[0] / written["step_latency_s"][0])
    at_four = dataclasses.replace(steps, r_max=4)
    # a member at r = 4 in a cached phase 3 steps in 4: its mean step from the two curves
    mean = (steps.step_s[0] + 3 * cached[0]) / 4
    assert at_four.mix_s({kind(0, 4): 1}) == pytest.approx(mean)
    assert at_four.cached_call_s(2) == cached[1]
    bad = CliRunner().invoke(app, ["profile", "--levels", "0,3", "--out", str(out)])
    assert bad.exit_code == 2 and "--levels" in bad.output
    # and the simulator runs on it: K_opt lands on the tiny model's own levels (0 and 10 of 20)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["a red fox in snow", "a red fox in the snow"] * 10) + "\n")
    sim = CliRunner().invoke(
        app,
        ["simulate", "--profile", str(out), "--slo", "5",
         "--policies", "argus,promptserve,promptserve-step",
         "--prompts", str(prompts), "--arrivals", "poisson", "--rate", "30", "--minutes", "1",
         "--embedder", "hashing", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert sim.exit_code == 0, sim.output
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    for row in report["policies"].values():
        assert row["lost"] == 0 and row["served_in_slo"] > 0


def test_thresholds_map_onto_an_engine_s_own_levels():
    from promptserve.cache.thresholds import embedder_thresholds

    ref = embedder_thresholds("minilm")
    assert ref.on_levels((0, 5, 10, 15, 20, 25), 50) == ref  # the reference maps onto itself
    tiny = ref.on_levels((0, 2, 4, 6, 8, 10), 20)
    assert tiny.levels == (10, 8, 6, 4, 2) and tiny.min_similarity == ref.min_similarity
    two = ref.on_levels((0, 10), 20)  # K = 10 of 20 is K = 25 of 50: only the top threshold
    assert two.levels == (10,) and two.min_similarity == (ref.min_similarity[0],)
    assert two.k_opt(0.99) == 10 and two.k_opt(0.9) == 0


def test_calibration_fit_keeps_the_model_shape():
    from promptserve.engine.calibrate import Sample, fit

    samples = [
        Sample(0.99, 10, 2, 99.0),
        Sample(0.99, 10, 6, 97.0),
        Sample(0.99, 10, 10, 98.0),
        Sample(0.7, 2, 2, 96.0),
        Sample(0.7, 2, 6, 90.0),
        Sample(0.7, 2, 10, 86.0),
    ]
    f = fit(samples, (0, 2, 6, 10))
    assert f.level_quality[0] == 100.0
    assert all(b <= a for a, b in zip(f.level_quality, f.level_quality[1:]))  # never rises with K
    assert f.level_quality[3] == 97.0  # 98 at K=10 is clipped to the K=6 figure
    # above K_opt = 2: K=6 is one level up (Q[6] = 97, scored 90), K=10 two up (97 - 86) / 2
    assert f.per_level == pytest.approx(((97 - 90) + (97 - 86) / 2) / 2)
    assert f.cap == pytest.approx(88.0)


def test_the_interval_fit_is_least_squares_through_the_origin_on_the_cached_share():
    from promptserve.engine.calibrate import IntervalSample, fit_intervals

    # r = 2 loses 1 point (share 1/2), r = 4 loses 3 (share 3/4): a = (0.5 + 2.25) / (0.25 + 0.5625)
    samples = [IntervalSample(0, 2, 99.0), IntervalSample(0, 4, 97.0)]
    f = fit_intervals([*samples, IntervalSample(6, 4, 90.0, 95.0)])
    assert f.loss_per_share == pytest.approx(2.75 / 0.8125)
    assert f.by_interval == {2: 99.0, 4: 97.0}
    # composition: the pair scored 95 at K = 6, r = 1; the product predicts 95 x q_r(4) / 100
    assert f.combined_measured == 90.0
    assert f.combined_predicted == pytest.approx(95.0 * (100 - f.loss_per_share * 0.75) / 100)
    assert fit_intervals([IntervalSample(0, 3, 100.5)]).loss_per_share == 0.0  # never a gain


def test_calibrate_command_measures_pairs_on_the_tiny_model(tmp_path):
    import json

    from typer.testing import CliRunner

    from promptserve.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "a red fox in the snow\na red fox in deep snow\na lighthouse at dusk\nrobot\n"
    )
    out = tmp_path / "fit.json"
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--prompts",
            str(prompts),
            "--embedder",
            "hashing",
            "--pairs",
            "2",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    fitted = json.loads(out.read_text())
    assert fitted["levels"] == [0, 2, 4, 6, 8, 10] and fitted["level_quality"][0] == 100.0
    q = fitted["level_quality"]
    assert all(b <= a for a, b in zip(q, q[1:])) and all(0 <= v <= 100 for v in q)
    assert fitted["per_level"] >= 0
    # the tiny model has a feature cache: each interval scored from noise, its loss fitted
    intervals = fitted["intervals"]
    assert set(intervals["by_interval"]) == {"2", "3", "4"}
    assert all(0 <= q <= 100 for q in intervals["by_interval"].values())
    assert intervals["loss_per_share"] >= 0 and "points lost when every step" in res.output
    bad = CliRunner().invoke(app, ["calibrate", "--prompts", str(prompts), "--scorer", "vibes"])
    assert bad.exit_code == 2 and "scorer 'vibes'" in bad.output


def test_fidelity_scorer_is_100_for_the_same_image_and_lower_otherwise(full_run, engine):
    from promptserve.engine.scoring import FidelityScorer

    other = engine.generate([GenerationItem("castle", 0, seed=99)])[0]
    scores = FidelityScorer().relative(
        ["a", "b"], [full_run.png, other.png], [full_run.png, full_run.png]
    )
    assert scores[0] == 100.0 and scores[1] < 100.0


def test_a_similar_prompt_resumes_from_the_cached_latent_and_survives_restart(engine, tmp_path):
    from promptserve.cache.approx import ApproxCache
    from promptserve.cache.embed import HashingEmbedder
    from promptserve.cache.thresholds import shipped_thresholds
    from promptserve.engine.runner import generate_with_cache

    emb = HashingEmbedder()
    cache = ApproxCache(
        tmp_path, emb.dim, shipped_thresholds("clip"), total_steps=engine.total_steps
    )
    (first,) = generate_with_cache(
        engine, cache, emb, "alice", ["a red fox in the snow at dawn"], 0.0
    )
    assert first.k == 0 and first.similarity is None
    (second,) = generate_with_cache(
        engine, cache, emb, "alice", ["a red fox in the snow at dawn!"], 1.0
    )
    # similarity 0.92 tolerates K = 20 of 50 steps: level 8 of the tiny model's 20
    assert second.similarity > 0.9 and second.k == 8
    assert second.result.k == 8 and sorted(second.result.latents) == [10]
    (other,) = generate_with_cache(
        engine, cache, emb, "bob", ["a red fox in the snow at dawn!"], 2.0
    )
    assert other.k == 0  # another tenant does not see alice's entries
    cache.close()
    reopened = ApproxCache(
        tmp_path, emb.dim, shipped_thresholds("clip"), total_steps=engine.total_steps
    )
    assert len(reopened.index) == 3
    hit = reopened.lookup("alice", emb.embed(["a red fox in the snow at dawn"])[0])
    assert hit is not None and reopened.latent(hit.entry, 10) is not None
    # alice's miss, alice's resumed run (8 and 10 its own, 2 to 6 its neighbour's), bob's miss
    assert len(reopened.store.keys()) == 5 + 5 + 5


def family_engine(family: str, steps: int = 10, levels=(0, 2, 4)):
    """A tiny random-weight model of ``family`` (engine.shapes) on the CPU."""
    from promptserve.engine.flow import DEFAULT_GUIDANCE
    from promptserve.engine.shapes import build
    from promptserve.engine.tiny import DenoisingEngine

    return DenoisingEngine(
        build(family), f"tiny-{family}", steps, levels, DEFAULT_GUIDANCE.get(family, 7.5)
    )


def tiny_xl_engine():
    """SDXL-shaped components from configs: two text encoders, pooled + time-id conditioning."""
    return family_engine("sdxl")


def test_sdxl_conditioning_runs_and_resumes_exactly():
    xl = tiny_xl_engine()
    full = xl.generate([GenerationItem("a castle on a hill", 0, seed=2)])[0]
    resumed = xl.generate([GenerationItem("a castle on a hill", 4, full.latents[4])])[0]
    assert np.abs(resumed.final_latent - full.final_latent).max() <= 1e-5
    other = xl.generate([GenerationItem("a submarine", 4, full.latents[4])])[0]
    assert (
        np.abs(other.final_latent - full.final_latent).max() > 1e-4
    )  # the second encoder steers it


def test_finishers_are_decoded_a_few_at_a_time_and_the_same_as_at_once(engine, monkeypatch):
    import torch

    from promptserve.engine import denoise

    c = engine.c
    latents = torch.randn(10, *c.latent_shape, generator=torch.Generator().manual_seed(3))
    at_once = denoise.decode_png(c, latents)
    calls: list[int] = []
    vae_decode = c.vae.decode

    def counted(x, *a, **k):
        calls.append(len(x))
        return vae_decode(x, *a, **k)

    side = latents.shape[-1] * latents.shape[-2]
    monkeypatch.setattr(denoise, "DECODE_LATENT_PIXELS", 3 * side)  # three per call here
    monkeypatch.setattr(c.vae, "decode", counted)
    chunked = c.decode(latents)
    assert calls == [3, 3, 3, 1]
    assert chunked == at_once  # the same PNGs, byte for byte
