"""The flow-matching transformer families (SD3, Flux) on tiny random-weight models, and every
family's loop against diffusers' own pipeline on the same modules."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from promptserve.engine.base import GenerationItem
from promptserve.engine.denoise import denoise
from promptserve.engine.diffusers_backend import diffusers_engine, family_of, levels_for
from promptserve.engine.flow import DEFAULT_GUIDANCE, pack, unpack
from promptserve.engine.pipelines import pipeline_for
from promptserve.engine.shapes import build, byte_tokenizer
from promptserve.engine.tiny import ByteTokenizer
from promptserve.errors import InputError
from test_engine import family_engine

FLOW = ["sd3", "flux"]


@pytest.mark.parametrize("family", FLOW)
def test_resuming_from_the_model_s_own_latent_reproduces_the_full_run(family):
    engine = family_engine(family)
    full = engine.generate([GenerationItem("a castle on a hill", 0, seed=2)])[0]
    assert set(full.latents) == {2, 4}  # captured at every level it passes
    for k in (2, 4):
        resumed = engine.generate([GenerationItem("a castle on a hill", k, full.latents[k])])[0]
        assert np.abs(resumed.final_latent - full.final_latent).max() <= 1e-5
        assert set(resumed.latents) == {lv for lv in (2, 4) if lv > k}
    other = engine.generate([GenerationItem("a submarine", 4, full.latents[4])])[0]
    assert np.abs(other.final_latent - full.final_latent).max() > 1e-4  # the prompt steers it


@pytest.mark.parametrize("family", FLOW)
def test_a_png_of_the_model_s_size_comes_out(family):
    engine = family_engine(family)
    (result,) = engine.generate([GenerationItem("a lighthouse", 0, seed=1)])
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert result.final_latent.shape == (16, 8, 8)  # unpacked for the cache, Flux too


@pytest.mark.parametrize("family", ["tiny", "sdxl", *FLOW])
def test_our_loop_equals_the_diffusers_pipeline_on_the_same_modules(family):
    c = build(family)
    guidance = DEFAULT_GUIDANCE.get(family, 7.5)
    start = c.noise(5)
    ours, _ = denoise(c, start, ["a red fox"], 0, 6, [], guidance)
    pipe = pipeline_for(c, guidance)
    kwargs = {"max_sequence_length": c.max_sequence_length} if family in FLOW else {}
    latents = pack(start) if family == "flux" else start
    theirs = pipe(
        ["a red fox"], latents=latents, num_inference_steps=6, guidance_scale=guidance,
        output_type="latent", height=64, width=64, **kwargs,
    ).images  # fmt: skip
    if family == "flux":
        theirs = unpack(theirs, 8, 8)
    assert ours.shape == theirs.shape
    assert torch.abs(ours - theirs).max() <= 1e-5


def test_the_byte_tokenizer_gives_the_tiny_model_s_ids():
    texts = ["a red fox é", "x" * 100, ""]
    fast = byte_tokenizer()(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    )
    assert (fast["input_ids"] == ByteTokenizer()(texts)["input_ids"]).all()


def test_levels_map_onto_a_shorter_schedule_by_fraction():
    assert levels_for(50) == (0, 5, 10, 15, 20, 25)
    assert levels_for(28) == (0, 2, 5, 8, 11, 14)
    assert all(k / 28 <= ref / 50 for k, ref in zip(levels_for(28), levels_for(50)))


@pytest.mark.parametrize("family", FLOW)
def test_a_saved_flow_pipeline_is_served_by_its_family_with_28_steps(family, tmp_path, caplog):
    c = build(family)
    pipeline_for(c, DEFAULT_GUIDANCE[family]).save_pretrained(tmp_path)
    assert family_of(str(tmp_path)) == family
    with caplog.at_level(logging.WARNING):
        engine = diffusers_engine(str(tmp_path))
    assert "accelerate" not in caplog.text  # installed: diffusers loads without its warning
    assert engine.total_steps == 28 and engine.levels == (0, 2, 5, 8, 11, 14)
    assert engine.c.family == family and engine.guidance == DEFAULT_GUIDANCE[family]
    full = engine.generate([GenerationItem("a red fox", 0, seed=1)])[0]
    resumed = engine.generate([GenerationItem("a red fox", 8, full.latents[8])])[0]
    assert np.abs(resumed.final_latent - full.final_latent).max() <= 1e-5


def test_an_unsupported_family_gets_one_line_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(InputError, match="KandinskyPipeline") as err:
        family_of(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="model_index.json"):
        family_of(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("policy", ["promptserve", "promptserve-step"])
def test_a_saved_sd3_folder_is_served_through_the_openai_client(tmp_path, policy):
    import base64

    from factories import client
    from promptserve.server import ServerConfig, build_app
    from promptserve.server.live import LiveServer

    pipeline_for(build("sd3"), DEFAULT_GUIDANCE["sd3"]).save_pretrained(tmp_path / "model")
    config = ServerConfig(
        model=str(tmp_path / "model"), embedder="hashing", cache_dir=tmp_path / "c",
        slo_s=120, policy=policy,
    )  # fmt: skip
    with LiveServer(build_app(config)) as url:
        images = client(url).images
        first = images.generate(prompt="a red fox in the snow", size="64x64")
        again = images.generate(prompt="a red fox in the snow", size="64x64")
    png = base64.b64decode(first.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert first.data[0].model_extra["promptserve"]["similarity"] is None
    assert again.data[0].model_extra["promptserve"]["similarity"] > 0.99  # the cache took it


def test_a_single_file_checkpoint_is_named_as_one_with_how_to_convert_it(tmp_path):
    checkpoint = tmp_path / "sdxl.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="single-file checkpoint") as err:
        family_of(str(checkpoint))
    assert "from_single_file" in str(err.value) and "\n" not in str(err.value)


def test_the_dtype_follows_the_device_unless_given():
    from promptserve.config import ServeFile
    from promptserve.engine import resolved_dtype

    assert ServeFile().dtype == "auto"
    assert resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("auto", "cuda:1") == "float16" == resolved_dtype("auto", "mps")
    assert resolved_dtype("bfloat16", "cuda") == "bfloat16"
