"""Every public parser answers any input with a value or a clean ``InputError``, never a crash."""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import FormData, UploadFile

from promptserve.config import load_serve_file
from promptserve.errors import InputError
from promptserve.profile import load_profile
from promptserve.server.editform import parse_edit_form
from promptserve.server.editinput import paint_mask, read_image
from promptserve.workload.arrivals import generate_arrivals, parse_arrival_spec
from promptserve.workload.prompts import load_prompts

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIR = Path(tempfile.mkdtemp(prefix="fuzz-"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=6)
    ),
    max_leaves=30,
)
toml_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
)
SERVE_KEYS = [
    "model",
    "backend",
    "workers",
    "slo_s",
    "policy",
    "embedder",
    "device",
    "port",
    "host",
    "max_body_bytes",
    "speedup",
    "ray",
    "ray_worker_cpus",
    "ray_worker_gpus",
    "bogus",
]


def clean(parse, *args):
    """Run a parser: a value or InputError pass; any other exception fails the test."""
    try:
        return parse(*args)
    except InputError as exc:
        assert str(exc)  # the message names the problem
        return None


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


@FUZZ
@given(st.dictionaries(st.sampled_from(SERVE_KEYS), toml_values, max_size=6))
def test_config_file(fields):
    path = DIR / "serve.toml"
    path.write_text("".join(f"{k} = {toml_literal(v)}\n" for k, v in fields.items()))
    clean(load_serve_file, path)


@FUZZ
@given(st.binary(max_size=300))
def test_config_file_bytes(raw):
    path = DIR / "raw.toml"
    path.write_bytes(raw)
    clean(load_serve_file, path)


@FUZZ
@given(json_values)
def test_profile_file(value):
    path = DIR / "profile.json"
    path.write_text(json.dumps(value))
    clean(load_profile, path)


@FUZZ
@given(st.binary(max_size=400))
def test_prompt_file(raw):
    path = DIR / "prompts.txt"
    path.write_bytes(raw)
    prompts = clean(load_prompts, path)
    assert prompts is None or all(p.strip() for p in prompts)


@FUZZ
@given(st.text(max_size=60), st.binary(max_size=300))
def test_arrival_spec_and_its_file(spec, content):
    (DIR / "rates.csv").write_bytes(content)
    for text in (spec, f"rates:{DIR / 'rates.csv'}", f"trace:{DIR / 'rates.csv'}"):
        parsed = clean(parse_arrival_spec, text)
        if parsed is not None:
            times = clean(lambda p=parsed: generate_arrivals(p, rate_qpm=30, minutes=1))
            assert times is None or (len(times) == 0 or times.min() >= 0)


PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_an_uploaded_image_and_mask(raw, as_png):
    data = PNG_HEAD + raw if as_png else raw
    image = clean(read_image, data)
    assert image is None or image.size[0] * image.size[1] > 0
    mask = clean(paint_mask, data, (8, 8))
    assert mask is None or set(np.unique(mask)) <= {0, 255}


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["prompt", "n", "size", "strength", "seed", "stream", "lora", "lora[][name]",
                         "lora[][scale]", "guidance_scale", "deadline_ms", "input_fidelity", "x"]),
        st.text(max_size=20), max_size=8,
    )
)  # fmt: skip
def test_an_edit_form(fields):
    form = FormData([("image", UploadFile(io.BytesIO(b"x"), filename="a.png")), *fields.items()])
    parsed = clean(parse_edit_form, form)
    assert parsed is None or (parsed.req.prompt and parsed.image == b"x")
