"""Every size a server lists, in one server: per-member latent shapes in batches and step-level
runs (one denoiser call per shape), equal to diffusers' pipelines at that size, and a cache
that resumes only from a neighbour of the same size."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from factories import client, staggered, tiny_app, tiny_server
from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.flow import DEFAULT_GUIDANCE, pack, unpack
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.engine.sizes import checked, default_sizes, parse_size, parse_sizes
from promptserve.errors import InputError
from promptserve.server.live import LiveServer
from test_engine import family_engine

WIDE = (64, 48)  # (width, height): a latent of 6 x 8, every tiny family's multiple


def test_sizes_parse_and_each_family_has_its_usual_set():
    assert parse_size("1152x896") == (1152, 896)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        parse_size("1152*896")
    with pytest.raises(InputError, match="listed twice"):
        parse_sizes("64x64,64x64")
    with pytest.raises(InputError, match="multiple of 16"):
        checked(parse_sizes("64x64,50x50"), 16)
    sdxl = default_sizes("sdxl", (1024, 1024), 32)
    assert sdxl[0] == (1024, 1024) and (1152, 896) in sdxl and (768, 1344) in sdxl
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in sdxl)
    assert all(0.85 < w * h / 1024**2 < 1.1 for w, h in sdxl)  # about one megapixel each
    assert default_sizes("sd", (512, 512), 64) == ((512, 512), (576, 448), (448, 576))
    assert default_sizes("tiny", (64, 64), 16) == ((64, 64), (32, 32), (96, 64), (64, 96))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_non_square_size_equals_the_diffusers_pipeline_at_that_size(family):
    """SDXL's size ids, SD3's patches and Flux's shifted schedule and position ids follow the
    member's size."""
    c = build(family)
    start = c.noise(5, WIDE)
    assert start.shape[2:] == (WIDE[1] // 8, WIDE[0] // 8)
    guidance = DEFAULT_GUIDANCE.get(family, 7.5)
    ours, _ = denoise(c, start, ["a red fox"], 0, 6, [], guidance, looks=[Look(size=WIDE)])
    kwargs = {"max_sequence_length": c.max_sequence_length} if family != "sdxl" else {}
    theirs = pipeline_for(c, guidance)(
        ["a red fox"], latents=pack(start) if family == "flux" else start,
        num_inference_steps=6, guidance_scale=guidance, output_type="latent",
        height=WIDE[1], width=WIDE[0], **kwargs,
    ).images  # fmt: skip
    if family == "flux":
        theirs = unpack(theirs, WIDE[1] // 8, WIDE[0] // 8)
    assert ours.shape == theirs.shape
    assert torch.abs(ours - theirs).max() <= 1e-5


def png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


@pytest.mark.parametrize("family", ["tiny", "sdxl", "flux"])
def test_a_member_is_the_same_alone_and_in_a_mixed_size_batch(family):
    engine = family_engine(family, steps=6, levels=(0, 2))
    sizes = [None, WIDE, (48, 64)]
    items = [
        GenerationItem(f"a harbour {i}", seed=i, look=Look(size=s)) for i, s in enumerate(sizes)
    ]
    batch = engine.generate(items)
    for item, got in zip(items, batch, strict=True):
        alone = engine.generate([item])[0]
        assert np.abs(got.final_latent - alone.final_latent).max() <= 1e-4
        assert png_size(got.png) == (item.look.size or engine.native)
    # step-level: members of three sizes in one running batch, joined at different steps
    done = staggered(engine, items)
    for key in range(len(items)):
        assert np.abs(done[key].final_latent - batch[key].final_latent).max() <= 1e-4
        assert set(done[key].latents) == {2}  # captured at its level, in its own shape


@pytest.fixture(scope="module", params=["promptserve", "promptserve-step"])
def served(request, tmp_path_factory):
    yield from tiny_server(tmp_path_factory, request.param)


def test_the_official_client_gets_every_listed_size_concurrently(served):
    listed = httpx.get(f"{served}/v1/models/tiny", timeout=30).json()["sizes"]
    assert listed == ["64x64", "32x32", "96x64", "64x96"]
    assert httpx.get(f"{served}/v1/server", timeout=30).json()["sizes"] == listed
    oai = client(served)

    def one(size: str):
        res = oai.images.generate(prompt=f"a tram at {size}", size=size, extra_body={"seed": 3})
        return size, res

    with ThreadPoolExecutor(len(listed)) as pool:
        answers = list(pool.map(one, listed + ["auto"]))
    for size, res in answers:
        want = parse_size(listed[0] if size == "auto" else size)
        assert png_size(base64.b64decode(res.data[0].b64_json)) == want
        assert res.size is None  # not one of the official sizes: left out, as the schema says
    r = httpx.post(
        f"{served}/v1/images/generations", json={"prompt": "a tram", "size": "1024x1024"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert "64x64, 32x32, 96x64, 64x96" in r.json()["error"]["message"]
    by_size = {
        ln.split('"')[1]: float(ln.split()[-1])
        for ln in httpx.get(f"{served}/metrics", timeout=30).text.splitlines()
        if ln.startswith("promptserve_images_by_size_total{")
    }
    assert by_size["64x64"] >= 2 and all(by_size[s] >= 1 for s in listed)  # auto is 64x64
    running = [
        ln for ln in httpx.get(f"{served}/metrics", timeout=30).text.splitlines()
        if ln.startswith("promptserve_running_by_size{")
    ]  # fmt: skip
    assert len(running) == len(listed) and all(ln.endswith(" 0.0") for ln in running)  # idle


def test_a_prompt_resumes_only_from_a_neighbour_of_its_own_size(tmp_path):
    app = tiny_app(tmp_path, policy="clipper-ht+shed+admit", sizes=((64, 64), (96, 64)))
    with LiveServer(app) as url:
        oai = client(url)

        def meta(size: str):
            res = oai.images.generate(prompt="a lighthouse at dusk", size=size)
            return res.data[0].model_extra["promptserve"]

        assert meta("64x64")["cache_hit"] is False
        assert meta("96x64")["cache_hit"] is False  # the 64x64 entry is another shape
        assert meta("96x64")["cache_hit"] is True  # its own size's entry
        assert meta("64x64")["cache_hit"] is True
        assert httpx.get(f"{url}/v1/models/tiny").json()["sizes"] == ["64x64", "96x64"]


def test_a_size_the_model_cannot_make_is_refused_at_start(tmp_path):
    with pytest.raises(InputError, match="50x50 is not a multiple of 16"):
        tiny_app(tmp_path, sizes=((64, 64), (50, 50)))
