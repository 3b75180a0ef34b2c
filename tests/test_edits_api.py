"""``POST /v1/images/edits`` through the official client, on the tiny model, pinned and
step-level: image-to-image and inpainting answers that reproduce by seed, change their image,
keep what the mask keeps, stream, leave the cache alone, and refuse bad input by field."""

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from factories import client, tiny_app
from promptserve.loadgen import read_metric
from promptserve.server.live import LiveServer

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["promptserve", "promptserve-step"])
def url(request, tmp_path_factory):
    app = tiny_app(tmp_path_factory.mktemp("srv"), policy=request.param)
    with LiveServer(app) as url:
        yield url


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def hole(size=(64, 64), box=(16, 48)) -> np.ndarray:
    """A mask: opaque, fully transparent (edit here) inside ``box`` on both axes."""
    mask = np.full((*size[::-1], 4), 255, np.uint8)
    mask[box[0] : box[1], box[0] : box[1], 3] = 0
    return mask


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(float)


def edit(url, seed, extra=None, **fields):
    fields.setdefault("image", ("in.png", png(PICTURE), "image/png"))
    answer = client(url, timeout=120).images.edit(
        prompt="a lighthouse at dusk", size="64x64", extra_body={"seed": seed, **(extra or {})},
        **fields,
    )  # fmt: skip
    return answer, pixels(answer.data[0].b64_json)


def test_an_edit_reproduces_by_seed_differs_by_seed_and_changes_its_image(url):
    first, a = edit(url, 7)
    _, again = edit(url, 7)
    _, other = edit(url, 8)
    assert (a == again).all()
    assert np.abs(a - other).mean() > 5.0
    assert np.abs(a - PICTURE).mean() > 5.0
    meta = first.data[0].model_extra["promptserve"]
    # strength 0.6 by default: the last 60% of the tiny model's steps, from its own image
    assert meta["edit_start"] == meta["level_k"] > 0 and not meta["cache_hit"]
    assert meta["predicted_quality"] == 100.0 and first.quality == "high"


def test_strength_moves_the_start_step(url):
    low, _ = edit(url, 1, {"strength": 0.3})
    high, _ = edit(url, 1, {"strength": 0.9})
    start = [a.data[0].model_extra["promptserve"]["edit_start"] for a in (low, high)]
    assert start[0] > start[1] > 0


def test_with_a_mask_two_seeds_differ_inside_it_and_keep_the_image_outside(url):
    mask = ("mask.png", png(hole()), "image/png")
    first, a = edit(url, 1, mask=mask)
    _, b = edit(url, 2, mask=mask)
    inside = (slice(16, 48), slice(16, 48))
    assert np.abs(a[inside] - b[inside]).mean() > 5.0
    outside = np.ones((64, 64), bool)
    outside[inside] = False
    assert (a[outside] == PICTURE[outside]).all() and (b[outside] == PICTURE[outside]).all()
    # with a mask, strength 1.0 by default: the masked region from noise, every step
    assert first.data[0].model_extra["promptserve"]["edit_start"] == 0


def test_an_edit_streams_its_partial_images_then_the_completed_one(url):
    events = list(
        client(url, timeout=120).images.edit(
            image=("in.png", png(PICTURE), "image/png"), prompt="a kite", size="64x64",
            stream=True, partial_images=1,
        )
    )  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert pixels(events[-1].b64_json).shape == (64, 64, 3)


def test_auto_size_is_the_served_size_nearest_the_images_shape(url):
    wide = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)  # 3:2, as the tiny 96x64
    answer = client(url, timeout=120).images.edit(
        image=("in.jpg", png(wide, "JPEG"), "image/jpeg"), prompt="a boat", size="auto"
    )
    assert pixels(answer.data[0].b64_json).shape == (64, 96, 3)


def test_an_edit_neither_reads_nor_writes_the_cache(url):
    before = read_metric(url, "promptserve_cache_entries")
    lookups = read_metric(url, "promptserve_cache_lookups_total")
    for seed in range(3):
        edit(url, 100 + seed)
    assert read_metric(url, "promptserve_cache_entries") == before
    assert read_metric(url, "promptserve_cache_lookups_total") == lookups


def post(url, files=None, data=None, **kw):
    return httpx.post(f"{url}/v1/images/edits", files=files, data=data, timeout=60, **kw)


@pytest.mark.parametrize(
    "files, data, field",
    [
        ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", png(PICTURE)[:200], "image/png")}, {"prompt": "x"}, "image"),
        ({"image": ("a.gif", b"GIF89a" + bytes(64), "image/gif")}, {"prompt": "x"}, "image"),
        (None, {"prompt": "x"}, "image"),
        ({"image": ("a.png", png(PICTURE), "image/png"),
          "mask": ("m.png", png(hole((32, 32), (4, 8))), "image/png")}, {"prompt": "x"}, "mask"),
        ({"image": ("a.png", png(PICTURE), "image/png"),
          "mask": ("m.png", png(PICTURE), "image/png")}, {"prompt": "x"}, "mask"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "strength": "0"},
         "strength"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "n": "two"}, "n"),
        ({"image": ("a.png", png(PICTURE), "image/png")},
         {"prompt": "x", "input_fidelity": "high"}, "input_fidelity"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "colour": "red"},
         "colour"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {}, "prompt"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "size": "65x65"},
         "size"),
    ],
)  # fmt: skip
def test_bad_edit_input_is_a_400_naming_the_field(url, files, data, field):
    files = files or {"other": ("x.txt", b"x", "text/plain")}
    r = post(url, files=files, data=data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"], error


def test_the_official_client_hears_a_bad_image_as_a_bad_request_naming_it(url):
    with pytest.raises(openai.BadRequestError, match="image"):
        client(url).images.edit(image=("a.png", b"not a picture", "image/png"), prompt="x")


def test_a_json_edit_is_refused_naming_the_content_type(url):
    r = httpx.post(f"{url}/v1/images/edits", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and "content-type" in r.json()["error"]["message"]


def test_a_decompression_bomb_is_refused_before_it_is_decoded(url):
    big = Image.new("L", (5000, 5000))  # 25 Mpx of one colour: a few kB as a PNG
    out = io.BytesIO()
    big.save(out, format="PNG")
    r = post(url, files={"image": ("bomb.png", out.getvalue(), "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]


def test_metrics_count_answered_images_by_kind_and_keep_edits_out_of_the_k_mix(url):
    def kinds():
        return {
            k: read_metric(url, "promptserve_images_by_kind_total", {"kind": k})
            for k in ("generation", "edit", "inpaint")
        }

    levels = read_metric(url, "promptserve_images_by_level_total", {"level": "0"})
    before = kinds()
    edit(url, 11)
    edit(url, 12, mask=("mask.png", png(hole()), "image/png"))
    client(url, timeout=120).images.generate(prompt="a quiet harbour", size="64x64")
    after = kinds()
    assert {k: after[k] - before[k] for k in after} == {"generation": 1, "edit": 1, "inpaint": 1}
    # the inpainting edit started at step 0 and the generation too: only the generation is K = 0
    assert read_metric(url, "promptserve_images_by_level_total", {"level": "0"}) <= levels + 1


def test_an_edit_runs_as_a_job_and_its_answer_equals_the_direct_ones(url):
    files = {
        "image": ("in.png", png(PICTURE), "image/png"),
        "mask": ("m.png", png(hole()), "image/png"),
    }
    data = {"prompt": "a lighthouse at dusk", "size": "64x64", "seed": "21"}
    r = post(url, files=files, data=data)  # the direct answer
    direct = pixels(r.json()["data"][0]["b64_json"])
    job = httpx.post(f"{url}/v1/jobs/edits", files=files, data=data, timeout=60)
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 60
    while (state := httpx.get(f"{url}/v1/jobs/{job.json()['id']}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "succeeded"
    assert (pixels(state["data"][0]["b64_json"]) == direct).all()
    bad = httpx.post(f"{url}/v1/jobs/edits", data={"prompt": "x"}, files={"x": ("a", b"a")})
    assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]


def test_an_upload_may_be_larger_than_a_json_body_but_not_without_bound(url):
    big = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    data = png(big)
    assert len(data) > 1 << 20  # over the JSON routes' 1 MiB body limit
    r = post(url, files={"image": ("big.png", data, "image/png")}, data={"prompt": "x"})
    assert r.status_code == 200, r.text
    huge = {"image": ("huge.png", bytes(42 * 1024 * 1024), "image/png")}
    r = post(url, files=huge, data={"prompt": "x"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
