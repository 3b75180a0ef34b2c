"""Per-request negative prompts and guidance scales: the same computation as diffusers' own
pipelines, per member inside a batch and a step-level run, checked at the API, and kept apart
in the cache."""

import base64

import httpx
import numpy as np
import pytest
import torch

from factories import client, tiny_app, tiny_server
from promptserve.engine.base import PLAIN, UNET_GUIDANCE, GenerationItem, Guidance, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.flow import DEFAULT_GUIDANCE, pack, unpack
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.server.live import LiveServer
from test_engine import family_engine

PROMPTS = ["a red fox", "a castle by the sea"]


@pytest.mark.parametrize("family", ["tiny", "sdxl", "sd3"])
def test_negative_prompts_and_a_scale_equal_the_diffusers_pipeline(family):
    c = build(family)
    start = torch.cat([c.noise(5), c.noise(6)])
    looks = [Look("blurry, low quality", 5.0), Look("dark", 5.0)]
    ours, _ = denoise(c, start, PROMPTS, 0, 6, [], 7.5, looks=looks)
    kwargs = {"max_sequence_length": c.max_sequence_length} if family == "sd3" else {}
    theirs = pipeline_for(c, 5.0)(
        PROMPTS, negative_prompt=[look.negative_prompt for look in looks], latents=start,
        num_inference_steps=6, guidance_scale=5.0, output_type="latent", height=64, width=64,
        **kwargs,
    ).images  # fmt: skip
    assert torch.abs(ours - theirs).max() <= 1e-5
    plain, _ = denoise(c, start, PROMPTS, 0, 6, [], 5.0)
    assert torch.abs(ours - plain).max() > 1e-3  # the negative prompts steer it


def test_flux_s_distilled_scale_equals_the_diffusers_pipeline():
    c = build("flux")
    start = c.noise(5)
    ours, _ = denoise(c, start, PROMPTS[:1], 0, 6, [], 3.5, looks=[Look(guidance=2.0)])
    theirs = pipeline_for(c, 2.0)(
        PROMPTS[:1], latents=pack(start), num_inference_steps=6, guidance_scale=2.0,
        output_type="latent", height=64, width=64, max_sequence_length=c.max_sequence_length,
    ).images  # fmt: skip
    assert torch.abs(ours - unpack(theirs, 8, 8)).max() <= 1e-5
    default, _ = denoise(c, start, PROMPTS[:1], 0, 6, [], 3.5)
    assert torch.abs(ours - default).max() > 1e-4


MIXED = [
    GenerationItem("a lighthouse", seed=1),
    GenerationItem("a lighthouse", seed=1, look=Look("fog", 3.0)),
    GenerationItem("a harbour at night", seed=2, look=Look(guidance=12.0)),
    GenerationItem("a harbour at night", seed=2, look=Look("fog")),
]


@pytest.mark.parametrize("family", ["tiny", "sd3", "flux"])
def test_a_member_s_image_is_the_same_alone_and_in_a_batch_of_other_looks(family):
    engine = family_engine(family, steps=6, levels=(0, 2))
    items = MIXED if family != "flux" else [i for i in MIXED if not i.look.negative_prompt]
    batch = engine.generate(items)
    alone = [engine.generate([item])[0] for item in items]
    for b, a in zip(batch, alone, strict=True):
        assert np.abs(b.final_latent - a.final_latent).max() <= 1e-4  # batch vs alone: rounding
    finals = {b.final_latent.tobytes() for b in batch}
    assert len(finals) == len(items)  # every look gives its own image


def test_step_level_members_keep_their_own_look():
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    runner = engine.step_runner()
    runner.join([(0, MIXED[0]), (1, MIXED[1])])
    runner.step()
    runner.step()
    runner.join([(2, MIXED[2]), (3, MIXED[3])])  # they join two steps later, beside them
    done = {}
    while runner.slots:
        done.update(runner.step())
    for key, item in enumerate(MIXED):
        alone = engine.generate([item])[0]
        assert np.abs(done[key].final_latent - alone.final_latent).max() <= 1e-4


def test_the_default_scale_spelt_out_is_the_plain_look_and_the_same_bytes():
    assert UNET_GUIDANCE.look(None, 7.5) is PLAIN or UNET_GUIDANCE.look(None, 7.5) == PLAIN
    assert UNET_GUIDANCE.look("", None).plain and not UNET_GUIDANCE.look("x", None).plain
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    plain = engine.generate([GenerationItem("a kite", seed=3)])[0]
    spelt = engine.generate([GenerationItem("a kite", seed=3, look=Look(guidance=7.5))])[0]
    assert plain.png == spelt.png and (plain.final_latent == spelt.final_latent).all()


def test_what_each_family_s_guidance_refuses():
    assert UNET_GUIDANCE.refusal("blurry", 1.0) is None
    field, why = UNET_GUIDANCE.refusal(None, 25.0)
    assert field == "guidance_scale" and "1-20" in why and "classifier-free" in why
    assert UNET_GUIDANCE.refusal(None, float("nan"))[0] == "guidance_scale"
    dev = build("flux").guidance_spec
    assert dev.kind == "distilled" and dev.default == DEFAULT_GUIDANCE["flux"]
    field, why = dev.refusal("blurry", None)
    assert field == "negative_prompt" and "distilled" in why
    assert dev.refusal(None, 12.0)[0] == "guidance_scale" and dev.refusal(None, 4.0) is None
    schnell = Guidance("none", 3.5)
    assert schnell.refusal(None, 3.5)[0] == "guidance_scale"
    assert build("sd3").guidance_spec.kind == "cfg"


@pytest.fixture(scope="module", params=["promptserve", "promptserve-step"])
def served(request, tmp_path_factory):
    yield from tiny_server(tmp_path_factory, request.param)


def test_the_official_client_sends_a_negative_prompt_and_a_scale(served):
    oai = client(served)

    def image(**extra):
        res = oai.images.generate(prompt="a copper kettle", extra_body={"seed": 4, **extra})
        return res.data[0].b64_json, res.data[0].model_extra["promptserve"]

    plain, meta = image()
    assert meta["guidance_scale"] == 7.5
    guidance = httpx.get(f"{served}/v1/server", timeout=30).json()["guidance"]
    assert guidance == {"kind": "cfg", "default": 7.5, "low": 1.0, "high": 20.0}
    negative, _ = image(negative_prompt="steam")
    scaled, meta_scaled = image(guidance_scale=2)  # an integer is a number
    assert meta_scaled["guidance_scale"] == 2.0
    assert len({plain, negative, scaled}) == 3
    assert image(negative_prompt="steam")[0] == negative  # reproducible with its look
    assert base64.b64decode(plain)[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"guidance_scale": 25}, 400, "guidance_scale"),
        ({"guidance_scale": 0.5}, 400, "guidance_scale"),
        ({"guidance_scale": "5"}, 400, "guidance_scale"),
        ({"guidance_scale": True}, 400, "guidance_scale"),
        ({"negative_prompt": 3}, 400, "negative_prompt"),
        ({"negative_prompt": "x" * 4001}, 400, "negative_prompt"),
    ],
)
def test_a_guidance_it_cannot_serve_is_named(served, body, status, param):
    r = httpx.post(
        f"{served}/v1/images/generations", json={"prompt": "a kettle", **body}, timeout=30
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_look_resumes_only_from_neighbours_made_with_the_same_look(tmp_path):
    # clipper-ht: every request at the fastest level its neighbour allows, so a hit shows
    app = tiny_app(tmp_path, policy="clipper-ht+shed+admit")
    with LiveServer(app) as url:
        oai = client(url)

        def meta(**extra):
            res = oai.images.generate(prompt="a lighthouse at dusk", extra_body=extra)
            return res.data[0].model_extra["promptserve"]

        assert meta()["cache_hit"] is False
        assert meta(negative_prompt="fog")["cache_hit"] is False  # the plain entry is not its
        assert meta(guidance_scale=3.0)["cache_hit"] is False
        assert meta(negative_prompt="fog")["cache_hit"] is True  # its own look's entry
        assert meta(guidance_scale=7.5)["cache_hit"] is True  # the default: the plain entry
        assert meta(guidance_scale=3.0, negative_prompt="fog")["cache_hit"] is False
