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
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.tiny import (
    BOS,
    EOS,
    MAX_TOKENS,
    PAD,
    ByteTokenizer,
    build_tiny,
    ddim_scheduler,
    tiny_text_config,
    tiny_unet_config,
    vae_config,
)
from promptserve.engine.zimage import ZImageComponents

FAMILIES = ("tiny", "sdxl", "sd3", "flux")  # "tiny" is the SD-1.x-shaped one


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: what the ByteLevel pre-tokenizer emits."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = dict(zip(keep, map(chr, keep), strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(max_length: int = MAX_TOKENS):
    """A transformers fast tokenizer that gives the ids ``tiny.ByteTokenizer`` gives (UTF-8
    bytes between BOS and EOS, PAD after): what a diffusers pipeline needs in a tokenizer slot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _byte_chars().items()}
    vocab.update({"<bos>": BOS, "<eos>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        model_max_length=max_length,
    )  # fmt: skip


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
SD_VAE = (128, 256, 512, 512)


def _cast(module, dtype: torch.dtype):  # noqa: ANN001, ANN201
    """Cast as soon as built: the float32 copy of a 12B model is freed before the next is made."""
    return module.to(dtype=dtype)


def _finish(modules, device: str, dtype: torch.dtype) -> None:
    for m in modules:
        if m is not None:
            m.to(device=device, dtype=dtype).eval()


def sd_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> Components:
    """SD 1.x: the tiny engine's model, or SD 1.5's UNet, VAE and CLIP-L."""
    if scale == "tiny":
        c = build_tiny(size=size)
        _finish((c.unet, c.vae, c.text_encoder), device, dtype)
        return dataclasses.replace(c, device=device, dtype=dtype)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768)
    vae = AutoencoderKL(**vae_config(size, SD_VAE, layers_per_block=2))
    text = _clip(False, **CLIP_L)
    _finish((unet, vae, text), device, dtype)
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
    _finish((unet, vae, first, second), device, dtype)
    return Components(
        unet, vae, first, ByteTokenizer(), ddim_scheduler(), vae.config.scaling_factor,
        (4, size // 8, size // 8), device=device, dtype=dtype, text_encoder_2=second,
        tokenizer_2=ByteTokenizer(),
    )  # fmt: skip


def _flow_vae(scale: str, size: int, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    widths, extra = (SD_VAE, {"layers_per_block": 2})
    if scale == "tiny":
        widths, extra = (16, 16, 32, 32), {"layers_per_block": 1, "norm_num_groups": 8}
    return AutoencoderKL(
        **vae_config(size, widths, latent_channels=16, scaling_factor=scaling,
                     shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False, **extra)
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
            _cast(_t5(**T5_XXL), dtype),
        )  # fmt: skip
        sequence = 256
    vae = _flow_vae(scale, size, 1.5305, 0.0609)
    _finish((model, vae, *encoders), device, dtype)
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
        model = _cast(FluxTransformer2DModel(guidance_embeds=True), dtype)
        encoders = (_clip(False, **CLIP_L), _cast(_t5(**T5_XXL), dtype))
        sequence = 512
    vae = _flow_vae(scale, size, 0.3611, 0.1159)
    _finish((model, vae, *encoders), device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return FlowComponents(
        "flux", model, vae, encoders, (byte_tokenizer(), byte_tokenizer(sequence)), scheduler,
        (16, latent, latent), device=device, dtype=dtype, max_sequence_length=sequence,
    )  # fmt: skip


# Qwen3's chat turn, as Z-Image's pipeline wraps a prompt (its tokenizer's template, shortened)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def zimage_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> ZImageComponents:
    """Z-Image: a single-stream DiT over 2x2 patches of 16-channel latents and a Qwen3 text
    encoder's penultimate states (Turbo's scheduler: a fixed shift of 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(4)
    latent = size // 8
    if scale == "tiny":
        model = ZImageTransformer2DModel(
            in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
            cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
        )  # fmt: skip
        text = Qwen3Model(
            Qwen3Config(
                vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512,
            )
        )  # fmt: skip
        sequence = 64
    else:
        model = _cast(ZImageTransformer2DModel(), dtype)
        text = _cast(
            Qwen3Model(
                Qwen3Config(
                    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                )
            ),
            dtype,
        )  # fmt: skip
        sequence = 512
    vae = _flow_vae(scale, size, 0.3611, 0.1159)
    _finish((model, vae, text), device, dtype)
    tokenizer = byte_tokenizer(sequence)
    tokenizer.chat_template = CHAT_TEMPLATE
    return ZImageComponents(
        model, vae, text, tokenizer, FlowMatchEulerDiscreteScheduler(shift=3.0),
        (16, latent, latent), device=device, dtype=dtype, max_sequence_length=sequence,
    )  # fmt: skip


def qwenimage_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> QwenImageComponents:
    """Qwen-Image: an MMDiT over 2x2 patches of 16-channel latents, a Qwen2.5-VL text encoder
    (its language model read; the vision tower idle), a video VAE with one frame."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(5)
    if scale != "tiny":
        raise ValueError("Qwen-Image is built at tiny scale only (real weights are the user's)")
    model = QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    text = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=None,
            ),
            vision_config=dict(
                depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32
            ),
            vocab_size=260, hidden_size=32, bos_token_id=None, eos_token_id=None,
        )
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    _finish((model, vae, text), device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192,
    )  # fmt: skip
    latent = size // 8
    return QwenImageComponents(
        model, vae, text, byte_tokenizer(1100), scheduler, (16, latent, latent), device=device,
        dtype=dtype,
    )  # fmt: skip


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
            model = _cast(FluxTransformer2DModel.from_config(config), dtype)
            _finish((model,), device, dtype)
            return dataclasses.replace(c, transformer=model)
        config = {k: v for k, v in c.unet.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
        _finish((unet,), device, dtype)
        return dataclasses.replace(c, unet=unet)

    return build_inpainting


BUILDERS = {
    "tiny": sd_shaped,
    "sdxl": sdxl_shaped,
    "sd3": sd3_shaped,
    "flux": flux_shaped,
    "zimage": zimage_shaped,
    "qwenimage": qwenimage_shaped,
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
