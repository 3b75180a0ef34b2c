"""What the tiny and full builders of every family share (``shapes``, ``tokenshapes``): a byte
tokenizer a diffusers pipeline accepts, the flow families' VAE, and how modules are cast and
placed as soon as they are built."""

from __future__ import annotations

import torch

from promptserve.engine.tiny import BOS, EOS, MAX_TOKENS, PAD, vae_config

SD_VAE = (128, 256, 512, 512)


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


def cast(module, dtype: torch.dtype):  # noqa: ANN001, ANN201
    """Cast as soon as built: the float32 copy of a 12B model is freed before the next is made."""
    return module.to(dtype=dtype)


def finish(modules, device: str, dtype: torch.dtype) -> None:
    for m in modules:
        if m is not None:
            m.to(device=device, dtype=dtype).eval()


def flow_vae(scale: str, size: int, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    widths, extra = (SD_VAE, {"layers_per_block": 2})
    if scale == "tiny":
        widths, extra = (16, 16, 32, 32), {"layers_per_block": 1, "norm_num_groups": 8}
    return AutoencoderKL(
        **vae_config(size, widths, latent_channels=16, scaling_factor=scaling,
                     shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False, **extra)
    )  # fmt: skip
