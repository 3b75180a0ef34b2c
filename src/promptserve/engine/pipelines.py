"""diffusers' own pipelines over our components (the references every family is tested and
timed against: ``tests/``, ``engine.speed``), and their call from our start latents."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch

from promptserve.engine.flow import FlowComponents
from promptserve.engine.qwenedit import QwenEditComponents
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.shapes import byte_tokenizer
from promptserve.engine.zimage import ZImageComponents


def pipeline_for(c, guidance: float):  # noqa: ANN001, ANN201 - components; a diffusers pipeline
    """diffusers' own pipeline over the same modules (byte tokenizers that give our ids)."""
    import diffusers

    if isinstance(c, QwenEditComponents):
        pipe = diffusers.QwenImageEditPlusPipeline(
            scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
            tokenizer=c.tokenizer, processor=vl_processor(c), transformer=c.transformer,
        )  # fmt: skip
    elif isinstance(c, QwenImageComponents):
        pipe = diffusers.QwenImagePipeline(
            scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
            tokenizer=c.tokenizer, transformer=c.transformer,
        )  # fmt: skip
    elif isinstance(c, ZImageComponents):
        pipe = diffusers.ZImagePipeline(
            scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
            tokenizer=c.tokenizer, transformer=c.transformer,
        )  # fmt: skip
    elif isinstance(c, FlowComponents):
        if c.family == "sd3":
            l_enc, g_enc, t5 = c.text_encoders
            l_tok, g_tok, t5_tok = c.tokenizers
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=c.transformer, scheduler=c.scheduler, vae=c.vae,
                text_encoder=l_enc, tokenizer=l_tok, text_encoder_2=g_enc, tokenizer_2=g_tok,
                text_encoder_3=t5, tokenizer_3=t5_tok,
            )  # fmt: skip
        else:
            clip, t5 = c.text_encoders
            clip_tok, t5_tok = c.tokenizers
            kind = diffusers.FluxKontextPipeline if c.kontext else diffusers.FluxPipeline
            pipe = kind(
                scheduler=c.scheduler, vae=c.vae, text_encoder=clip, tokenizer=clip_tok,
                text_encoder_2=t5, tokenizer_2=t5_tok, transformer=c.transformer,
            )  # fmt: skip
    elif c.text_encoder_2 is not None:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
            tokenizer=byte_tokenizer(), tokenizer_2=byte_tokenizer(), unet=c.unet,
            scheduler=c.scheduler, force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=byte_tokenizer(), unet=c.unet,
            scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vl_processor(c: QwenEditComponents):  # noqa: ANN201 - transformers' Qwen2VLProcessor
    """The pipeline's processor over our tokenizer and image processor. Its video half needs
    torchvision, which does not install beside this torch; an edit reads images only, so it is
    built without one (the class check that asks for it skipped for this call alone)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
        return Qwen2VLProcessor(
            image_processor=c.image_processor, tokenizer=c.tokenizer, video_processor=None
        )


def save_pipeline(pipe, out: Path) -> None:  # noqa: ANN001 - a diffusers pipeline
    """``pipe.save_pretrained(out)``; a Qwen-Image-Edit pipeline's processor is written as its
    tokenizer and image processor (what ``diffusers_backend`` reads back), named in
    ``model_index.json`` as a real folder names it."""
    processor = getattr(pipe, "processor", None)
    if processor is None:
        pipe.save_pretrained(out)
        return
    pipe.register_modules(processor=None)
    try:
        pipe.save_pretrained(out)
    finally:
        pipe.register_modules(processor=processor)
    processor.tokenizer.save_pretrained(out / "processor")
    processor.image_processor.save_pretrained(out / "processor")
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def pipeline_call(pipe, c, prompts, latents: torch.Tensor, steps: int, guidance: float):  # noqa: ANN001
    """The pipeline's ``__call__`` from the given start latents (our unpacked shape), to images."""
    kwargs: dict = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pil"}
    if isinstance(c, QwenImageComponents):  # true CFG: one pass without a negative prompt
        from promptserve.engine.flow import pack

        kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
        latents = pack(latents)
    elif isinstance(c, FlowComponents | ZImageComponents):
        kwargs["max_sequence_length"] = c.max_sequence_length
        if c.family == "flux":
            from promptserve.engine.flow import pack

            latents = pack(latents)
    width, height = c.native
    return pipe(list(prompts), latents=latents, height=height, width=width, **kwargs).images
