import numpy as np
import pytest

from promptserve.errors import InputError
from promptserve.workload import (
    argus_segments,
    generate_arrivals,
    load_prompts,
    make_requests,
    parse_arrival_spec,
)
from promptserve.workload.arrivals import read_trace_offsets, trace_arrivals


def test_text_prompts_keep_order_and_skip_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_prompts(f) == ["a cat", "a dog", "a cat"]


def test_tsv_prompts_read_the_prompt_column(data_dir):
    prompts = load_prompts(data_dir / "PartiPrompts.tsv")
    assert len(prompts) == 1632
    assert prompts[0] == "bond"


def test_project_prompt_file_has_its_prompts(data_dir):
    assert len(load_prompts(data_dir / "diffusiondb_prompts_4k.txt")) == 3999  # one line is blank


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("p.tsv", "Text\tCategory\nx\ty\n", "no 'Prompt' column"),
        ("p.txt", "\n\n", "holds no prompts"),
        ("p.txt", "x" * 5000, "characters"),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path, name, content, needle):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(InputError, match=needle):
        load_prompts(f)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")


def test_poisson_is_deterministic_by_seed_and_has_its_rate():
    spec = parse_arrival_spec("poisson")
    a = generate_arrivals(spec, rate_qpm=120, minutes=30, seed=7)
    b = generate_arrivals(spec, rate_qpm=120, minutes=30, seed=7)
    c = generate_arrivals(spec, rate_qpm=120, minutes=30, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0) and a[0] >= 0 and a[-1] < 30 * 60
    assert abs(len(a) - 3600) < 5 * np.sqrt(3600)


def test_argus_shape_has_three_bursts_and_compresses():
    full = argus_segments()
    assert full[-1].end_min == pytest.approx(840)
    bursts = [s for s in full if s.qpm == 390]
    assert len(bursts) == 3 and all(s.end_min - s.start_min == 150 for s in bursts)
    fast = generate_arrivals(parse_arrival_spec("argus"), time_scale=10, seed=1)
    assert fast[-1] < 84 * 60
    expected = (390 * 450 + 50 * 390) / 10
    assert abs(len(fast) - expected) < 5 * np.sqrt(expected)
    burst = fast[(fast >= 9 * 60) & (fast < 24 * 60)]
    assert len(burst) / 15 == pytest.approx(390, rel=0.05)


def test_trace_rescaling_keeps_the_shape_and_sets_the_rate(data_dir):
    offsets = read_trace_offsets(data_dir / "AzureLLMInferenceTrace_conv.csv")
    own_qpm = len(offsets) / (offsets[-1] / 60)
    half = trace_arrivals(offsets, own_qpm / 2, None)
    assert np.allclose(half, offsets * 2)  # stretched in time, nothing else changed
    out = generate_arrivals(
        parse_arrival_spec(f"trace:{data_dir}/AzureLLMInferenceTrace_conv.csv"),
        rate_qpm=60,
        minutes=600,
    )
    assert len(out) / 600 == pytest.approx(60, rel=0.02)
    assert out[-1] < 600 * 60 and np.all(np.diff(out) >= 0)


def test_rates_file_is_piecewise_constant(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("minute,qpm\n0,60\n10,600\n20,0\n")
    out = generate_arrivals(parse_arrival_spec(f"rates:{f}"), seed=3)
    assert abs((out < 600).sum() - 600) < 5 * np.sqrt(600)
    assert abs(((out >= 600) & (out < 1200)).sum() - 6000) < 5 * np.sqrt(6000)
    assert (out >= 1200).sum() == 0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("minute,rate\n0,1\n", "lacks column"),
        ("minute,qpm\n0,fast\n", "qpm 'fast' is not a number"),
        ("minute,qpm\n5,1\n2,1\n", "minutes must increase"),
        ("minute,qpm\n0,-1\n", ">= 0"),
    ],
)
def test_bad_rates_files_name_the_problem(tmp_path, content, needle):
    f = tmp_path / "r.csv"
    f.write_text(content)
    with pytest.raises(InputError, match=needle):
        generate_arrivals(parse_arrival_spec(f"rates:{f}"))


def test_bad_trace_timestamp_names_the_line(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("TIMESTAMP,x\n2023-11-16 18:15:46.6805900,1\nyesterday,2\n")
    with pytest.raises(InputError, match=r":3: TIMESTAMP 'yesterday'"):
        generate_arrivals(parse_arrival_spec(f"trace:{f}"))


@pytest.mark.parametrize(
    ("spec", "kwargs", "needle"),
    [
        ("gamma", {}, "is not one of"),
        ("trace:", {}, "needs a file path"),
        ("trace:/no/such.csv", {}, "does not exist"),
        ("poisson", {}, "need --rate"),
        ("poisson", {"rate_qpm": -3}, "--rate must be > 0"),
        ("argus", {"rate_qpm": 5}, "--rate applies to poisson and trace"),
        ("argus", {"time_scale": 0}, "--time-scale"),
    ],
)
def test_bad_arrival_specs(spec, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        generate_arrivals(parse_arrival_spec(spec), **kwargs)


def test_requests_pair_prompts_in_order_and_wrap():
    reqs = make_requests(["a", "b"], np.array([0.0, 1.0, 2.5]), slo_s=21.0, tenant="t")
    assert [r.prompt for r in reqs] == ["a", "b", "a"]
    assert [r.id for r in reqs] == [0, 1, 2]
    assert reqs[2].deadline_s == 23.5 and reqs[2].slo_s == 21.0
    assert [r.tenant for r in reqs] == ["t", "t", "t/pass2"]


def test_sizes_and_adapters_split_requests_into_the_server_s_cache_namespaces():
    from collections import Counter

    from promptserve.cache.spaces import cache_space
    from promptserve.engine.base import Look
    from promptserve.errors import InputError
    from promptserve.workload import make_requests
    from promptserve.workload.looks import LookMix, parse_adapters, parse_size_mix, with_looks

    sizes, weights = parse_size_mix("1024x1024:0.6,1152x896:0.2,896x1152:0.2")
    assert sizes[1] == (1152, 896) and weights == (0.6, 0.2, 0.2)
    with pytest.raises(InputError, match="sum to 0.9"):
        parse_size_mix("1024x1024:0.6,1152x896:0.3")
    with pytest.raises(InputError, match="N:ALPHA"):
        parse_adapters("eight")
    requests = make_requests([f"p{i}" for i in range(50)], np.arange(2000, dtype=float), 21.0)
    mix = LookMix(sizes, weights, *parse_adapters("4:1.0"))
    split = with_looks(requests, mix, seed=1)
    assert [r.tenant for r in with_looks(requests, mix, seed=1)] == [r.tenant for r in split]
    assert [(r.id, r.prompt) for r in split] == [(r.id, r.prompt) for r in requests]
    looks = Counter(r.tenant.split("\x1f", 1)[1] for r in split)  # every pass's tenant too
    wide = cache_space("t", Look(size=(1152, 896), lora=(("adapter0", 1.0),))).split("\x1f")[1]
    own = cache_space("t", Look(lora=(("adapter0", 1.0),))).split("\x1f")[1]  # the model's size
    assert wide in looks and own in looks and len(looks) == 12  # 3 sizes x 4 adapters
    last = cache_space("t", Look(lora=(("adapter3", 1.0),))).split("\x1f")[1]
    assert looks[own] > 2 * looks[last]  # Zipf: adapter 0 four times as likely as adapter 3
    assert with_looks(requests, LookMix(), seed=1) == requests  # no mix: as before
    assert {r.adapters for r in split} == {(1,), (2,), (3,), (4,)}  # ids from 1, as served
    assert {r.shape for r in split} == {0, 1, 2}
    assert parse_adapters("32:1.0:8") == (32, 1.0, 8, 0.05)
    assert parse_adapters("32:1.0:8:0.2")[3] == 0.2
    with pytest.raises(InputError, match="RESIDENT"):
        parse_adapters("32:1.0:-1")
