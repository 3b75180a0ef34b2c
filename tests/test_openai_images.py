"""The images endpoint as the official description defines it (data/openai_images_openapi.json):
answers that validate, streaming partial images, output formats, and a decision for every
request field (the README's table)."""

import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image

from factories import client, modeled_app, official, tiny_app
from promptserve.engine.base import preview_steps
from promptserve.server.live import LiveServer


@pytest.fixture(scope="module", params=["promptserve", "promptserve-step"])
def served(request, tmp_path_factory):
    """The tiny model, pinned and step-level: (url, policy)."""
    app = tiny_app(tmp_path_factory.mktemp("srv"), policy=request.param)
    with LiveServer(app) as url:
        yield url, request.param


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_official_client_streams_partial_images_then_the_completed_one(served):
    url, _ = served
    stream = client(url, timeout=120).images.generate(
        prompt="a lighthouse in a storm", size="64x64", stream=True, partial_images=2
    )
    events = list(stream)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert image_of(e.b64_json).size == (64, 64)  # previews at the requested size
    done = events[-1]
    assert image_of(done.b64_json).format == "PNG"
    assert done.usage.input_tokens > 0 and done.model_extra["promptserve"]["level_k"] == 0
    # a preview is the predicted clean image mid-way, not the final one
    assert events[0].b64_json != done.b64_json


def test_every_streamed_event_is_an_official_event(served):
    url, _ = served
    body = {"prompt": "a red kite", "stream": True, "partial_images": 3, "output_format": "webp"}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
    for event in data[:-1]:
        official("ImageGenPartialImageEvent").validate(event)
        assert image_of(event["b64_json"]).format == "WEBP"
    official("ImageGenCompletedEvent").validate(data[-1])
    assert [e["partial_image_index"] for e in data[:-1]] == list(range(len(data) - 1))
    # as many previews as the steps it ran can show (a run resumed at K has fewer)
    total = httpx.get(f"{url}/v1/server").json()["profile"]["total_steps"]
    level = data[-1]["promptserve"]["level_k"]
    assert len(data) - 1 == len(preview_steps(level, total, 3)) > 0


@pytest.mark.parametrize(
    ("fmt", "magic", "pil"),
    [("jpeg", b"\xff\xd8\xff", "JPEG"), ("webp", b"RIFF", "WEBP"), ("png", b"\x89PNG", "PNG")],
)
def test_output_formats_are_honoured_and_reported(served, fmt, magic, pil):
    url, _ = served
    res = client(url, timeout=120).images.generate(
        prompt="a teapot", output_format=fmt, output_compression=50
    )
    raw = base64.b64decode(res.data[0].b64_json)
    assert raw.startswith(magic) and Image.open(io.BytesIO(raw)).format == pil
    assert res.output_format == fmt
    by_url = client(url, timeout=120).images.generate(
        prompt="a teapot", output_format=fmt, response_format="url"
    )
    fetched = httpx.get(url + by_url.data[0].url)
    assert fetched.headers["content-type"] == f"image/{fmt}" and fetched.content.startswith(magic)


def test_answers_leave_out_absent_fields_instead_of_sending_null(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a fox"}, timeout=120)
    body = r.json()
    official("ImagesResponse").validate(body)
    assert set(body["data"][0]) == {"b64_json", "promptserve"}  # no url, no revised_prompt
    assert "size" not in body  # 64x64 is not one of the official sizes: left out, not faked
    assert body["quality"] in ("low", "medium", "high") and body["output_format"] == "png"


def test_quality_high_is_a_full_generation_that_ignores_the_cache(served):
    url, _ = served
    c = client(url, timeout=120)
    c.images.generate(prompt="a castle on a hill at dawn")
    twin = c.images.generate(prompt="a castle on a hill at dawn").data[0].model_extra
    exact = c.images.generate(prompt="a castle on a hill at dawn", quality="high")
    assert twin["promptserve"]["similarity"] > 0.99  # the cache knows this prompt
    meta = exact.data[0].model_extra["promptserve"]
    assert meta["similarity"] is None and meta["level_k"] == 0 and meta["k_opt"] == 0
    assert exact.quality == "high"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "style": "vivid"}, 400, "style"),
        ({"prompt": "x", "background": "transparent"}, 400, "background"),
        ({"prompt": "x", "partial_images": 2}, 400, "partial_images"),
        ({"prompt": "x", "stream": True, "n": 2}, 400, "n"),
        ({"prompt": "x", "n": 11}, 400, "n"),
        ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
        ({"prompt": "x", "output_compression": 101}, 400, "output_compression"),
        ({"prompt": "x", "partial_images": 4, "stream": True}, 400, "partial_images"),
        ({"prompt": "x", "quality": "ultra"}, 400, "quality"),
        ({"prompt": "x", "colour": "blue"}, 400, "colour"),
        ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
        # strict types: no string, boolean or number coerced into another type
        ({"prompt": "x", "n": "4"}, 400, "n"),
        ({"prompt": "x", "n": True}, 400, "n"),
        ({"prompt": "x", "n": 2.0}, 400, "n"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": "x", "stream": 1}, 400, "stream"),
        ({"prompt": "x", "deadline_ms": "60000"}, 400, "deadline_ms"),
    ],
)
def test_fields_not_honoured_are_refused_by_name(served, body, status, param):
    url, _ = served
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    if param == "model":  # what is served, and how to accept what a client always sends
        message = r.json()["error"]["message"]
        assert "served: tiny" in message and "--model-name dall-e-3" in message


def test_the_official_client_hears_an_unknown_model_named(served):
    url, _ = served
    with pytest.raises(openai.NotFoundError, match="served: tiny"):
        client(url).images.generate(prompt="x", model="dall-e-3")


@pytest.mark.parametrize("policy", ["promptserve", "promptserve-step"])
def test_closing_the_stream_cancels_the_generation(tmp_path, policy):
    app = modeled_app(tmp_path, policy=policy, speedup=2.0)  # seconds per image
    runtime = app.state.runtime
    body = {"prompt": "a long night", "stream": True, "partial_images": 3}
    with LiveServer(app) as url:
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    first = json.loads(line[5:])
                    break
        assert first["type"] == "image_generation.partial_image"
        deadline = time.monotonic() + 20
        while runtime.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
    assert not runtime.pending  # out of its batch (or its GPU's slot) before it finished
    assert runtime.counters.by_outcome["served"] == 0
    assert 'promptserve_requests_total{outcome="cancelled"} 1.0' in metrics


def test_a_body_without_a_json_content_type_is_told_so(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/images/generations", content=b'{"prompt": "x"}', timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert "application/json" in r.json()["error"]["message"]
    typed = httpx.post(
        f"{url}/v1/images/generations",
        content=b"prompt=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert "not application/x-www-form-urlencoded" in typed.json()["error"]["message"]


def test_the_images_endpoint_not_served_says_so(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/images/variations", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 404
    assert "images/variations is not served yet" in r.json()["error"]["message"]


def test_the_root_points_at_the_dashboard(served):
    url, _ = served
    r = httpx.get(f"{url}/", timeout=30)
    assert r.status_code == 307 and r.headers["location"] == "dashboard"
    assert "<html" in httpx.get(f"{url}/", follow_redirects=True, timeout=30).text.lower()


def test_a_seed_reproduces_the_image_and_another_seed_does_not(served):
    """On an idle server every request runs in full (K = 0), so its image is its seed's."""
    url, _ = served
    oai = client(url)

    def image(seed: int, n: int = 1):
        res = oai.images.generate(
            prompt="a copper kettle on a stove", n=n, extra_body={"seed": seed}
        )
        return [(d.b64_json, d.model_extra["promptserve"]) for d in res.data]

    (a, meta_a), (b, _) = image(7)[0], image(7)[0]
    (c, meta_c) = image(8)[0]
    assert meta_a["seed"] == 7 and meta_c["seed"] == 8
    assert meta_a["level_k"] == 0 and a == b  # the same bytes
    assert a != c
    pair = image(7, n=2)
    assert [m["seed"] for _, m in pair] == [7, 8] and pair[0][0] == a and pair[1][0] == c
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "seed": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
