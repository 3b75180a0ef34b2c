"""Random-weight models of each family's architecture, built from configs: no weights exist on
these machines and nothing is downloaded. ``tiny`` shapes run in seconds on a CPU (tests, the
CPU benchmark); ``full`` shapes are the published architectures (SD 1.5, SDXL, SD3 medium,
Flux dev) for timing on a GPU. Their images are noise; their compute is the real thing's.

``pipelines.pipeline_for`` wraps the same modules in diffusers' own pipeline, so our loop and the
library's ``__call__`` can be compared on identical components (``bench_engine``).
"""

from __future__ import annotations

import dataclasses

import torch

from promptserve.engine.denoise import Components
from promptserve.engine.flow import FlowComponents
from promptserve.engine.shapeparts import SD_VAE, byte_tokenizer, cast, finish, flow_vae
from promptserve.engine.tiny import (
    EOS,
    PAD,
    ByteTokenizer,
    build_tiny,
    ddim_scheduler,
    tiny_text_config,
    tiny_unet_config,
    vae_config,
)
from promptserve.engine.tokenshapes import qwenedit_shaped, qwenimage_shaped, zimage_shaped

__all__ = ["BUILDERS", "FAMILIES", "build", "byte_tokenizer"]

FAMILIES = ("tiny", "sdxl", "sd3", "flux")  # "tiny" is the SD-1.x-shaped one


def _clip(with_projection: bool, **config: object):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**tiny_text_config(**config)))


def _t5(**config: object):
    from transformers import T5Config, T5EncoderModel

    base = dict(vocab_size=260, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    return T5EncoderModel(T5Config(**{**base, **config}))


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu",
)  # fmt: skip
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
T5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def sd_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> Components:
    """SD 1.x: the tiny engine's model, or SD 1.5's UNet, VAE and CLIP-L."""
    if scale == "tiny":
        c = build_tiny(size=size)
        finish((c.unet, c.vae, c.text_encoder), device, dtype)
        return dataclasses.replace(c, device=device, dtype=dtype)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768)
    vae = AutoencoderKL(**vae_config(size, SD_VAE, layers_per_block=2))
    text = _clip(False, **CLIP_L)
    finish((unet, vae, text), device, dtype)
    return Components(
        unet, vae, text, ByteTokenizer(), ddim_scheduler(), 0.18215, (4, size // 8, size // 8),
        device=device, dtype=dtype,
    )  # fmt: skip


def sdxl_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> Components:
    """SDXL: two text encoders (the second with projection), pooled + size-id conditioning."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(1)
    if scale == "tiny":
        base = build_tiny(seed=1, size=size)
        unet = UNet2DConditionModel(
            **tiny_unet_config(
                size, cross_attention_dim=64, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
            )
        )  # fmt: skip
        first, vae = base.text_encoder, base.vae
        second = _clip(True, projection_dim=32)
    else:
        unet = UNet2DConditionModel(
            sample_size=size // 8, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        vae = AutoencoderKL(**vae_config(size, SD_VAE, layers_per_block=2, scaling_factor=0.13025))
        first, second = _clip(False, **CLIP_L), _clip(True, **CLIP_G)
    finish((unet, vae, first, second), device, dtype)
    return Components(
        unet, vae, first, ByteTokenizer(), ddim_scheduler(), vae.config.scaling_factor,
        (4, size // 8, size // 8), device=device, dtype=dtype, text_encoder_2=second,
        tokenizer_2=ByteTokenizer(),
    )  # fmt: skip


def sd3_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> FlowComponents:
    """SD3 medium: an MMDiT over 2x2 patches of 16-channel latents; CLIP-L, CLIP-G and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(2)
    latent = size // 8
    if scale == "tiny":
        model = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
            caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=max(16, latent),
        )  # fmt: skip
        encoders = (
            _clip(True, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                  projection_dim=32),
            _clip(True, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                  projection_dim=32),
            _t5(**T5_TINY),
        )  # fmt: skip
        sequence = 32
    else:
        model = SD3Transformer2DModel(
            sample_size=latent, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
            pos_embed_max_size=192,
        )  # fmt: skip
        encoders = (
            _clip(True, **CLIP_L, projection_dim=768), _clip(True, **CLIP_G),
            cast(_t5(**T5_XXL), dtype),
        )  # fmt: skip
        sequence = 256
    vae = flow_vae(scale, size, 1.5305, 0.0609)
    finish((model, vae, *encoders), device, dtype)
    return FlowComponents(
        "sd3", model, vae, encoders,
        (byte_tokenizer(), byte_tokenizer(), byte_tokenizer(sequence)),
        FlowMatchEulerDiscreteScheduler(shift=3.0), (16, latent, latent),
        device=device, dtype=dtype, max_sequence_length=sequence,
    )  # fmt: skip


def flux_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> FlowComponents:
    """Flux dev: double- and single-stream blocks over packed 2x2 latent patches, guidance
    distilled into an embedding; CLIP-L pooled and T5 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(3)
    latent = size // 8
    if scale == "tiny":
        model = FluxTransformer2DModel(
            in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
        encoders = (_clip(False), _t5(**T5_TINY))
        sequence = 32
    else:
        model = cast(FluxTransformer2DModel(guidance_embeds=True), dtype)
        encoders = (_clip(False, **CLIP_L), cast(_t5(**T5_XXL), dtype))
        sequence = 512
    vae = flow_vae(scale, size, 0.3611, 0.1159)
    finish((model, vae, *encoders), device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return FlowComponents(
        "flux", model, vae, encoders, (byte_tokenizer(), byte_tokenizer(sequence)), scheduler,
        (16, latent, latent), device=device, dtype=dtype, max_sequence_length=sequence,
    )  # fmt: skip


def schnell_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> FlowComponents:
    """FLUX.1-schnell: Flux without a guidance embedding, a fixed shift of 1 (its config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    c = flux_shaped(scale, device, dtype, size)
    config = {k: v for k, v in c.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(9)
    model = cast(FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}), dtype)
    finish((model,), device, dtype)
    return dataclasses.replace(
        c, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)
    )


def with_mask_channels(builder):  # noqa: ANN001, ANN201 - a builder; its inpainting variant
    """A family's dedicated inpainting model: the same parts, the denoiser taking mask
    channels beside the latent (a 9-channel UNet as SD's and SDXL's inpainting checkpoints;
    Flux Fill's transformer over the latent, the masked image's and 64 mask channels, packed)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    def build_inpainting(scale: str, device: str, dtype: torch.dtype, size: int):  # noqa: ANN202
        c = builder(scale, device, dtype, size)
        torch.manual_seed(7)
        if isinstance(c, FlowComponents):
            channels = c.latent_shape[0]
            config = {k: v for k, v in c.transformer.config.items() if not k.startswith("_")}
            config.update(in_channels=4 * (2 * channels + 64), out_channels=4 * channels)
            model = cast(FluxTransformer2DModel.from_config(config), dtype)
            finish((model,), device, dtype)
            return dataclasses.replace(c, transformer=model)
        config = {k: v for k, v in c.unet.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
        finish((unet,), device, dtype)
        return dataclasses.replace(c, unet=unet)

    return build_inpainting


BUILDERS = {
    "tiny": sd_shaped,
    "sdxl": sdxl_shaped,
    "sd3": sd3_shaped,
    "flux": flux_shaped,
    "flux-schnell": schnell_shaped,
    "zimage": zimage_shaped,
    "qwenimage": qwenimage_shaped,
    "qwenimage-edit": qwenedit_shaped,
    "flux-kontext": lambda scale, device, dtype, size: dataclasses.replace(
        flux_shaped(scale, device, dtype, size), kontext=True
    ),
    "tiny-inpaint": with_mask_channels(sd_shaped),
    "sdxl-inpaint": with_mask_channels(sdxl_shaped),
    "flux-fill": with_mask_channels(flux_shaped),
}


def build(
    family: str, scale: str = "tiny", device: str = "cpu", dtype=torch.float32, size: int = 64
):  # noqa: ANN201 - a family's components
    """Built on the device itself (a 12B transformer is initialised there, not on the CPU)."""
    if family not in BUILDERS:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if scale not in ("tiny", "full"):
        raise ValueError(f"scale {scale!r} is not tiny or full")
    if str(device).startswith("cuda"):
        with torch.device(device):
            return BUILDERS[family](scale, device, dtype, size)
    return BUILDERS[family](scale, device, dtype, size)
