"""LoRA adapters per request: per-sample deltas in one denoiser call, equal to diffusers'
``load_lora_weights`` + ``fuse_lora`` for a batch that shares one adapter, the same alone and in
a mixed batch, and files checked by name at start."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from factories import client, staggered, tiny_app, tiny_server
from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.denoise import denoise
from promptserve.engine.flow import DEFAULT_GUIDANCE, pack, unpack
from promptserve.engine.lora import PREFIX, random_adapter
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build
from promptserve.errors import InputError
from promptserve.server.live import LiveServer
from test_engine import family_engine

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def denoiser(c):
    return c.unet if c.family == "unet" else c.transformer


def write_adapter(c, folder, name, seed, rank=4, text=False):
    state = random_adapter(denoiser(c), PREFIX[c.family], rank, seed, TARGETS)
    if text:  # the text encoders' attention too, as many published adapters carry
        for part in ("text_encoder", "text_encoder_2"):
            if getattr(c, part, None) is not None:
                te = random_adapter(getattr(c, part), f"{part}.", rank, seed + 7, TEXT_TARGETS)
                state |= te
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file(state, path)
    return path


@pytest.mark.parametrize(
    ("family", "text"),
    [("tiny", False), ("sdxl", False), ("flux", False), ("tiny", True), ("sdxl", True)],
)
def test_per_sample_lora_equals_diffusers_fused_adapter(family, text, tmp_path):
    """With text-encoder weights, the prompt and the negative prompt are encoded through the
    adapted encoders, as diffusers' fused pipeline encodes them."""
    ours_c, theirs_c = build(family), build(family)  # the same weights, twice
    path = write_adapter(ours_c, tmp_path, "ink", seed=1, text=text)
    engine = family_engine(family, steps=6, levels=(0, 2))
    engine.c = ours_c
    engine.load_adapters(tmp_path)
    assert engine.adapters == ("ink",)
    guidance = DEFAULT_GUIDANCE.get(family, 7.5)
    start = torch.cat([ours_c.noise(5), ours_c.noise(6)])
    looks = [Look(lora=(("ink", 0.7),))] * 2
    prompts = ["a red fox", "a castle"]
    ours, _ = denoise(ours_c, start, prompts, 0, 6, [], guidance, looks=looks)
    pipe = pipeline_for(theirs_c, guidance)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="ink")
    pipe.fuse_lora(lora_scale=0.7)
    kwargs = {"max_sequence_length": theirs_c.max_sequence_length} if family == "flux" else {}
    theirs = pipe(
        prompts, latents=pack(start) if family == "flux" else start, num_inference_steps=6,
        guidance_scale=guidance, output_type="latent", height=64, width=64, **kwargs,
    ).images  # fmt: skip
    if family == "flux":
        theirs = unpack(theirs, 8, 8)
    assert torch.abs(ours - theirs).max() <= 1e-4
    plain, _ = denoise(ours_c, start, prompts, 0, 6, [], guidance)
    assert torch.abs(ours - plain).max() > 1e-3  # the adapter steers it


@pytest.mark.parametrize("family", ["tiny", "sd3"])
def test_a_member_is_the_same_alone_and_in_a_batch_of_other_adapters(family, tmp_path):
    engine = family_engine(family, steps=6, levels=(0, 2))
    write_adapter(engine.c, tmp_path, "ink", seed=1)
    write_adapter(engine.c, tmp_path, "oil", seed=2, text=family == "tiny")  # text encoder too
    engine.load_adapters(tmp_path)
    looks = [
        Look(),
        Look(lora=(("ink", 1.0),)),
        Look("fog", lora=(("oil", 0.5), ("ink", 1.5))),  # its negative through oil's encoder
    ]
    items = [GenerationItem("a quiet harbour", seed=3, look=look) for look in looks]
    batch = engine.generate(items)
    for item, got in zip(items, batch, strict=True):
        alone = engine.generate([item])[0]
        assert np.abs(got.final_latent - alone.final_latent).max() <= 1e-4
    assert len({b.final_latent.tobytes() for b in batch}) == 3  # same seed, three adapters
    done = staggered(engine, items)  # step-level: joined at different steps, one call a step
    for key in range(3):
        assert np.abs(done[key].final_latent - batch[key].final_latent).max() <= 1e-4
    zero = engine.generate(
        [GenerationItem("a quiet harbour", seed=3, look=Look(lora=(("ink", 0.0),)))]
    )
    plain = engine.generate([items[0]])
    assert (zero[0].final_latent == plain[0].final_latent).all()  # scale 0 is no adapter


def test_a_bad_adapter_file_is_named_at_start(tmp_path):
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="broken.safetensors"):
        engine.load_adapters(tmp_path)
    bad.unlink()
    other = build("sdxl")  # an adapter for another model: its shapes do not match
    write_adapter(other, tmp_path, "xl_only", seed=1)
    with pytest.raises(InputError, match="xl_only.safetensors"):
        engine.load_adapters(tmp_path)
    with pytest.raises(InputError, match="is not a folder"):
        engine.load_adapters(tmp_path / "missing")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random adapters for the tiny model, written by the CLI as a user would."""
    from typer.testing import CliRunner

    from promptserve.cli import app as cli

    folder = tmp_path_factory.mktemp("loras")
    for name, seed in (("ink", 1), ("oil", 2)):
        out = CliRunner().invoke(
            cli,
            ["lora", "random", "--out", str(folder / f"{name}.safetensors"), "--seed", str(seed)],
        )
        assert out.exit_code == 0, out.output
    return folder


@pytest.fixture(scope="module", params=["promptserve", "promptserve-step"])
def served(request, adapters, tmp_path_factory):
    yield from tiny_server(tmp_path_factory, request.param, lora_dir=adapters)


def test_the_official_client_sends_adapters_batched_together(served):
    assert httpx.get(f"{served}/v1/models/tiny", timeout=30).json()["adapters"] == ["ink", "oil"]
    oai = client(served)

    def image(lora):
        extra = {"seed": 9} | ({"lora": lora} if lora is not None else {})
        res = oai.images.generate(prompt="a paper boat", extra_body=extra)
        return res.data[0].b64_json, res.data[0].model_extra["promptserve"]

    asks = [None, [{"name": "ink"}], [{"name": "oil", "scale": 0.5}, {"name": "ink", "scale": 2}]]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(image, asks))
    assert len({png for png, _ in answers}) == 3  # the same seed, three adapter sets
    assert answers[0][1]["lora"] == [] and answers[1][1]["lora"] == [{"name": "ink", "scale": 1.0}]
    assert answers[2][1]["lora"] == [{"name": "oil", "scale": 0.5}, {"name": "ink", "scale": 2.0}]
    # alone on the idle server (a batch's composition moves the last bits): scale 0 is none
    assert image([{"name": "ink", "scale": 0}])[0] == image(None)[0]


@pytest.mark.parametrize(
    ("lora", "status"),
    [
        ([{"name": "watercolour"}], 400),
        ([{"name": "ink"}, {"name": "ink"}], 400),
        ([{"name": "ink", "scale": 2.5}], 400),
        ([{"name": "ink", "scale": "1"}], 400),
        ([{"name": "ink"}] * 5, 400),
    ],
)
def test_an_adapter_it_cannot_serve_is_named(served, lora, status):
    r = httpx.post(
        f"{served}/v1/images/generations", json={"prompt": "a boat", "lora": lora}, timeout=30
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"].startswith("lora")
    if lora[0]["name"] == "watercolour":
        assert "'watercolour'" in r.json()["error"]["message"] and "ink, oil" in r.text


def test_a_request_resumes_only_from_an_entry_of_its_own_adapters(adapters, tmp_path):
    app = tiny_app(tmp_path, policy="clipper-ht+shed+admit", lora_dir=adapters)
    with LiveServer(app) as url:
        oai = client(url)

        def hit(lora) -> bool:
            extra = {"lora": lora} if lora else {}
            res = oai.images.generate(prompt="a lighthouse at dusk", extra_body=extra)
            return res.data[0].model_extra["promptserve"]["cache_hit"]

        assert hit(None) is False
        assert hit([{"name": "ink"}]) is False  # the plain entry is another adapter set's
        assert hit([{"name": "ink", "scale": 0.5}]) is False  # and another scale's
        assert hit([{"name": "ink"}]) is True
        assert hit(None) is True


def test_a_kohya_file_reads_as_its_diffusers_equivalent(tmp_path):
    """kohya's layout (``lora_unet_..._to_q.lora_down.weight`` with an ``.alpha``), read through
    diffusers' converter, gives what the same weights in the PEFT layout at alpha / r give."""
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    state = random_adapter(engine.c.unet, "unet.", 4, 3, TARGETS)
    kohya, peft = {}, {}
    for key, value in state.items():
        module = key[len("unet.") : -len(".lora_A.weight")] if "lora_A" in key else None
        if module is None:
            continue
        up = state[f"unet.{module}.lora_B.weight"]
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = value
        kohya[f"{name}.lora_up.weight"] = up
        kohya[f"{name}.alpha"] = torch.tensor(2.0)  # alpha / r = 0.5
        peft[key], peft[f"unet.{module}.lora_B.weight"] = value, up * 0.5
    (tmp_path / "k").mkdir()
    (tmp_path / "p").mkdir()
    safetensors.torch.save_file(kohya, tmp_path / "k" / "kohya.safetensors")
    safetensors.torch.save_file(peft, tmp_path / "p" / "peft.safetensors")
    item = GenerationItem("a lantern", seed=2)
    results = []
    for folder, name in (("k", "kohya"), ("p", "peft")):
        e = family_engine("tiny", steps=6, levels=(0, 2))
        e.load_adapters(tmp_path / folder)
        results.append(
            e.generate([GenerationItem(item.prompt, seed=2, look=Look(lora=((name, 1.0),)))])[0]
        )
    assert np.abs(results[0].final_latent - results[1].final_latent).max() <= 1e-5


def test_only_the_resident_adapters_sit_on_the_device_and_the_rest_load_over_the_oldest(
    tmp_path,
):
    """Three adapters, two rows on the device: a call naming the third loads it over the
    least recently used one, and every image is what it is with all three resident."""
    names = ("ink", "oil", "wax")
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    for i, name in enumerate(names):
        write_adapter(engine.c, tmp_path, name, seed=i + 1)
    engine.load_adapters(tmp_path, resident=2)
    bank = engine.c.lora_bank
    assert engine.adapters == names and set(bank.index) == {"ink", "oil"}
    assert next(iter(bank.stacks.values()))[0].shape[0] == 3  # two rows and the empty one
    items = {
        n: GenerationItem("a quiet harbour", seed=3, look=Look(lora=((n, 1.0),))) for n in names
    }
    got = {n: engine.generate([items[n]])[0].final_latent for n in ("ink", "wax", "oil", "wax")}
    assert bank.stats.loads == 2 and bank.stats.evictions == 2  # wax over oil, oil over ink
    assert set(bank.index) == {"wax", "oil"}
    with pytest.raises(RuntimeError, match="more than 2 distinct adapters"):
        engine.generate(list(items.values()))  # three at once cannot sit in two rows
    everyone = family_engine("tiny", steps=6, levels=(0, 2))
    everyone.load_adapters(tmp_path, resident=8)
    for n in names:
        want = everyone.generate([items[n]])[0].final_latent
        assert np.abs(got[n] - want).max() <= 1e-6


def test_with_fewer_rows_than_adapters_every_request_is_served_and_the_loads_show(
    adapters, tmp_path
):
    """One adapter row per worker, two adapters: requests naming either, at once, all
    answered (the policy keeps a GPU's running members within its row), and the loads and
    evictions on /metrics; two adapters in one request cannot fit and are refused by name."""
    app = tiny_app(tmp_path, lora_dir=adapters, lora_resident=1, workers=2)
    with LiveServer(app) as url:
        profile = app.state.runtime.setting.profiles[0]
        assert profile.adapter_slots == 1 and profile.adapter_load_s > 0
        oai = client(url)

        def image(i: int) -> str:
            name = ("ink", "oil")[i % 2]
            res = oai.images.generate(
                prompt=f"a paper boat {i}", extra_body={"lora": [{"name": name}]}
            )
            return res.data[0].model_extra["promptserve"]["lora"][0]["name"]

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(image, range(6))) == ["ink", "oil"] * 3
        events = {
            ln.split('"')[1]: float(ln.split()[-1])
            for ln in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
            if ln.startswith("promptserve_adapter_residency{")
        }
        assert events["load"] >= 1 and events["eviction"] >= 1 and events["hit"] >= 1
        r = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a boat", "lora": [{"name": "ink"}, {"name": "oil"}]},
            timeout=30,
        )
        assert r.status_code == 400 and "holds 1 at once" in r.json()["error"]["message"]


def test_the_resident_bytes_bound_the_rows_and_too_few_are_named(adapters):
    engine = family_engine("tiny", steps=6, levels=(0, 2))
    engine.load_adapters(adapters)
    per = engine.c.lora_bank.slot_bytes()
    assert engine.c.lora_bank.capacity == 8 and per > 0
    bounded = family_engine("tiny", steps=6, levels=(0, 2))
    bounded.load_adapters(adapters, resident=8, resident_bytes=int(1.5 * per))
    assert bounded.c.lora_bank.capacity == 1 and len(bounded.c.lora_bank.index) == 1
    with pytest.raises(InputError, match="--lora-resident-bytes 10"):
        family_engine("tiny", steps=6, levels=(0, 2)).load_adapters(adapters, 8, 10)


def test_private_adapters_load_for_every_request_and_draw_the_same_images(adapters, tmp_path):
    """``--lora-private``: each request naming an adapter copies it in at its join, resident or
    not (shared: resident from the start, never loaded); the images are the same either way,
    and the policy is told to count a load every time."""
    items = {
        n: GenerationItem("a quiet harbour", seed=3, look=Look(lora=((n, 1.0),)))
        for n in ("ink", "oil")
    }
    order = ("ink", "ink", "oil", "ink")
    shared = family_engine("tiny", steps=6, levels=(0, 2))
    shared.load_adapters(adapters, resident=8)
    private = family_engine("tiny", steps=6, levels=(0, 2))
    private.load_adapters(adapters, resident=8, private=True)
    assert private.c.lora_bank.load_s > 0
    for n in order:
        a = shared.generate([items[n]])[0].final_latent
        b = private.generate([items[n]])[0].final_latent
        assert np.abs(a - b).max() <= 1e-6
    assert shared.c.lora_bank.stats.loads == 0  # both resident from the start
    assert private.c.lora_bank.stats.loads == len(order)  # a load per request
    app = tiny_app(tmp_path, lora_dir=adapters, lora_private=True)
    profile = app.state.runtime.setting.profiles[0]
    assert profile.adapter_private and profile.adapter_slots == 8 and profile.adapter_load_s > 0


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_the_new_families_take_per_sample_lora_as_diffusers_fuses_it(family, tmp_path):
    """Z-Image (guided: both passes through the adapter) and Qwen-Image: a batch on one
    adapter equals diffusers' fused pipeline; a member equals itself alone beside members of
    other adapters and none."""
    from promptserve.engine.diffusers_backend import levels_for
    from promptserve.engine.tiny import DenoisingEngine

    ours_c, theirs_c = build(family), build(family)
    path = write_adapter(ours_c, tmp_path, "ink", seed=1)
    write_adapter(ours_c, tmp_path, "oil", seed=2)
    guidance = 2.0 if family == "zimage" else 4.0
    engine = DenoisingEngine(ours_c, f"tiny-{family}", 4, levels_for(4), guidance)
    engine.load_adapters(tmp_path)
    start = torch.cat([ours_c.noise(5), ours_c.noise(6)])
    prompts, looks = ["a red fox", "a castle"], [Look(lora=(("ink", 0.7),))] * 2
    ours, _ = denoise(ours_c, start, prompts, 0, 4, [], guidance, looks=looks)
    pipe = pipeline_for(theirs_c, guidance)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="ink")
    pipe.fuse_lora(lora_scale=0.7)
    if family == "zimage":
        theirs = pipe(
            prompts, latents=start, num_inference_steps=4, guidance_scale=guidance,
            output_type="latent", height=64, width=64,
            max_sequence_length=theirs_c.max_sequence_length,
        ).images  # fmt: skip
    else:
        theirs = unpack(
            pipe(
                prompts, latents=pack(start), num_inference_steps=4, true_cfg_scale=guidance,
                output_type="latent", height=64, width=64,
            ).images,
            8, 8,
        )  # fmt: skip
    assert torch.abs(ours - theirs).max() <= 1e-4
    items = [
        GenerationItem("a quiet harbour", seed=3, look=look)
        for look in (Look(), Look(lora=(("ink", 1.0),)), Look("fog", lora=(("oil", 0.5),)))
    ]
    batch = engine.generate(items)
    for item, got in zip(items, batch, strict=True):
        alone = engine.generate([item])[0]
        assert np.abs(got.final_latent - alone.final_latent).max() <= 1e-4
    assert len({b.final_latent.tobytes() for b in batch}) == 3
