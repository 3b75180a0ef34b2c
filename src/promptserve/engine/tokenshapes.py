"""Tiny (and, for Z-Image, full) configs of the families whose prompts are token lists of
their own length: Z-Image, Qwen-Image and Qwen-Image-Edit (``shapes.BUILDERS`` lists them)."""

from __future__ import annotations

import torch

from promptserve.engine.qwenedit import QwenEditComponents
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.shapeparts import byte_tokenizer, cast, finish, flow_vae
from promptserve.engine.zimage import ZImageComponents

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
        model = cast(ZImageTransformer2DModel(), dtype)
        text = cast(
            Qwen3Model(
                Qwen3Config(
                    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                )
            ),
            dtype,
        )  # fmt: skip
        sequence = 512
    vae = flow_vae(scale, size, 0.3611, 0.1159)
    finish((model, vae, text), device, dtype)
    tokenizer = byte_tokenizer(sequence)
    tokenizer.chat_template = CHAT_TEMPLATE
    return ZImageComponents(
        model, vae, text, tokenizer, FlowMatchEulerDiscreteScheduler(shift=3.0),
        (16, latent, latent), device=device, dtype=dtype, max_sequence_length=sequence,
    )  # fmt: skip


# the vision tower's marks in the tokenizer (Qwen2.5-VL's names), after its byte ids
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


def _qwen_parts(vocab: int, **token_ids: int) -> tuple:
    """Qwen-Image's tiny transformer, Qwen2.5-VL text encoder (``token_ids``: its vision
    marks' ids), video VAE and scheduler, built in that order from the caller's seed."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model = QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    text = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=None,
            ),
            vision_config=dict(
                depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32
            ),
            vocab_size=vocab, hidden_size=32, bos_token_id=None, eos_token_id=None, **token_ids,
        )
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192,
    )  # fmt: skip
    return model, text, vae, scheduler


def qwenimage_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> QwenImageComponents:
    """Qwen-Image: an MMDiT over 2x2 patches of 16-channel latents, a Qwen2.5-VL text encoder
    (its language model read; the vision tower idle), a video VAE with one frame."""
    torch.manual_seed(5)
    if scale != "tiny":
        raise ValueError("Qwen-Image is built at tiny scale only (real weights are the user's)")
    model, text, vae, scheduler = _qwen_parts(260)
    finish((model, vae, text), device, dtype)
    latent = size // 8
    return QwenImageComponents(
        model, vae, text, byte_tokenizer(1100), scheduler, (16, latent, latent), device=device,
        dtype=dtype,
    )  # fmt: skip


def qwenedit_shaped(scale: str, device: str, dtype: torch.dtype, size: int) -> QwenEditComponents:
    """Qwen-Image-Edit: Qwen-Image's parts, the text encoder's vision tower reading the input
    images (its marks added to the byte tokenizer) and its image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(6)
    if scale != "tiny":
        raise ValueError(
            "Qwen-Image-Edit is built at tiny scale only (real weights are the user's)"
        )
    tokenizer = byte_tokenizer(4096)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    start, pad, end = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    video = len(tokenizer)  # unused: no video is read, but the config names one
    model, text, vae, scheduler = _qwen_parts(
        video + 1, vision_start_token_id=start, image_token_id=pad, vision_end_token_id=end,
        video_token_id=video,
    )  # fmt: skip
    finish((model, vae, text), device, dtype)
    latent = size // 8
    return QwenEditComponents(
        model, vae, text, tokenizer, scheduler, (16, latent, latent), device=device,
        dtype=dtype, image_processor=Qwen2VLImageProcessorPil(),
    )  # fmt: skip
