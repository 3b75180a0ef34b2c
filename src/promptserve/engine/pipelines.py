"""diffusers' own pipelines over our components (the references every family is tested and
timed against: ``tests/``, ``engine.speed``), and their call from our start latents."""

from __future__ import annotations

import torch

from promptserve.engine.flow import FlowComponents
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.shapes import byte_tokenizer
from promptserve.engine.zimage import ZImageComponents


def pipeline_for(c, guidance: float):  # noqa: ANN001, ANN201 - components; a diffusers pipeline
    """diffusers' own pipeline over the same modules (byte tokenizers that give our ids)."""
    import diffusers

    if isinstance(c, QwenImageComponents):
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
