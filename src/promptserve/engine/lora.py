"""LoRA adapters per request, batched: every member of one denoiser call brings its own.

A LoRA adapter adds ``scale * (alpha / r) * B (A x)`` to a linear layer's output. Fusing it into
the weights (diffusers' ``fuse_lora``) serves one adapter per model; here the base weights stay
as they are and each targeted layer adds every row's own adapters' low-rank deltas, gathered
per row (rows without an adapter gather zeros and add nothing): one denoiser call
serves members with different adapters, as S-LoRA and Punica do for language models. The rows
of a call are the members' (and, with classifier-free guidance, their negative passes too,
which diffusers' fused model also runs through the adapter).

Files: ``NAME.safetensors`` in the diffusers / PEFT layout (``unet.<module>.lora_A.weight``,
``lora_B``; ``transformer.`` for the flow families) or any layout diffusers' own converters
read (kohya's ``lora_unet_...``, with ``.alpha``); read through the family's
``lora_state_dict``. Linear layers of the denoiser and, for the UNet families, of the text
encoders (applied when a member's prompt and negative prompt are encoded, at join); a file with
convolution LoRA, or text-encoder weights for a transformer family, is reported by name at
start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from promptserve.errors import InputError

MAX_ADAPTERS_PER_REQUEST = 4
SCALE_RANGE = (0.0, 2.0)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREFIX = {
    "unet": "unet.",
    "sd3": "transformer.",
    "flux": "transformer.",
    "zimage": "transformer.",
    "qwenimage": "transformer.",
}
# (down, up) suffix pairs of the layouts diffusers' converters leave
SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


Pair = tuple[torch.Tensor, torch.Tensor, float]  # (A, B, alpha / r)


@dataclass
class Adapter:
    """One adapter's low-rank pairs per part of the model (``unet``, ``transformer``,
    ``text_encoder``, ``text_encoder_2``) and module: part -> module -> (A, B, alpha / r)."""

    name: str
    parts: dict[str, dict[str, Pair]]


def _loader(family: str, sdxl: bool):  # noqa: ANN202 - a diffusers LoRA loader mixin class
    from diffusers.loaders import lora_pipeline as lp

    if family == "flux":
        return lp.FluxLoraLoaderMixin
    if family == "sd3":
        return lp.SD3LoraLoaderMixin
    if family == "zimage":
        return lp.ZImageLoraLoaderMixin
    if family == "qwenimage":
        return lp.QwenImageLoraLoaderMixin
    return lp.StableDiffusionXLLoraLoaderMixin if sdxl else lp.StableDiffusionLoraLoaderMixin


def _peft_key(key: str) -> str:
    """A key of any layout diffusers' converters leave (its old attention-processor names
    among them, ``...attn1.processor.to_q_lora.down.weight``) in the PEFT layout."""
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS

    mapping = DIFFUSERS_OLD_TO_PEFT if key.startswith("text_encoder") else UNET_TO_DIFFUSERS
    key = key.replace(".processor.", ".")
    for old, new in mapping.items():
        if old in key:
            return key.replace(old, new)
    return key


def _module_of(key: str) -> str:
    """``part.module`` of a weight or alpha key in the PEFT layout."""
    for down, up in SUFFIXES:
        for suffix in (down, up, down.removesuffix(".weight"), up.removesuffix(".weight")):
            if key.endswith(suffix):
                return key[: -len(suffix)]
    return key


def read_adapter(
    path: Path, family: str, sdxl: bool, models: dict[str, torch.nn.Module]
) -> Adapter:
    """An adapter file as (A, B, alpha / r) per part (``models``: part name -> module tree)
    and module; a file whose layout diffusers cannot read, whose modules the model lacks, or
    that carries what is not served (convolution LoRA, a part not in ``models``) is an error
    naming the file and why."""
    name = path.stem
    if NAME.fullmatch(name) is None:
        raise InputError(f"LoRA {path.name}: the name {name!r} must be letters, digits, . _ -")
    loader = _loader(family, sdxl)
    kwargs = {"return_alphas": True} if family == "flux" else {}
    try:
        out = loader.lora_state_dict(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds on a foreign layout
        raise InputError(f"LoRA {path.name}: not a LoRA file diffusers can read ({exc})") from None
    state, alphas = (out if isinstance(out, tuple) else (out, None))[:2]
    state = {_peft_key(k): v for k, v in state.items()}
    alphas = {_peft_key(k.removesuffix(".alpha")): v for k, v in (alphas or {}).items()}
    alphas = {_module_of(k): v for k, v in alphas.items()}
    other = sorted({k.split(".", 1)[0] for k in state} - set(models))
    if other:
        raise InputError(
            f"LoRA {path.name}: carries weights for {', '.join(other)}; served for this model: "
            f"{', '.join(models)}"
        )
    parts: dict[str, dict[str, Pair]] = {}
    for key, down in state.items():
        part, _, rest = key.partition(".")
        for d, u in SUFFIXES:
            if rest.endswith(d):
                module = rest[: -len(d)]
                up = state.get(key[: -len(d)] + u)
                break
        else:
            continue
        model = models[part]
        if up is None:
            raise InputError(f"LoRA {path.name}: {key} has no matching up weight")
        if down.dim() != 2:
            raise InputError(f"LoRA {path.name}: {module} is a convolution LoRA, not served")
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise InputError(f"LoRA {path.name}: the model has no module {module}") from None
        if not isinstance(target, torch.nn.Linear):
            raise InputError(f"LoRA {path.name}: {module} is not a linear layer")
        if down.shape[1] != target.in_features or up.shape[0] != target.out_features:
            raise InputError(
                f"LoRA {path.name}: {module} is {tuple(up.shape[:1]) + tuple(down.shape[1:])}, "
                f"the model's is ({target.out_features}, {target.in_features})"
            )
        rank = down.shape[0]
        alpha = alphas.get(f"{part}.{module}")
        scaling = float(alpha) / rank if alpha is not None else 1.0
        parts.setdefault(part, {})[module] = (down, up, scaling)
    if not parts:
        raise InputError(f"LoRA {path.name}: no LoRA weights found")
    return Adapter(name, parts)


def adapter_files(folder: Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"--lora-dir {str(folder)!r} is not a folder")
    return sorted(folder.glob("*.safetensors"))


def adapter_names(folder: Path) -> tuple[str, ...]:
    names = tuple(p.stem for p in adapter_files(folder))
    for name in names:
        if NAME.fullmatch(name) is None:
            raise InputError(f"LoRA {name}.safetensors: the name must be letters, digits, . _ -")
    return names


def load_dir(
    folder: Path, family: str, sdxl: bool, models: dict[str, torch.nn.Module]
) -> list[Adapter]:
    """Every ``*.safetensors`` of a folder, each checked against the model (errors by name)."""
    return [read_adapter(p, family, sdxl, models) for p in adapter_files(folder)]


def random_adapter(
    model: torch.nn.Module, prefix: str, rank: int, seed: int, targets: Sequence[str]
) -> dict[str, torch.Tensor]:
    """A random adapter in the diffusers / PEFT layout over the model's linear layers whose
    names end in one of ``targets`` (tests and demos; real adapters are the user's)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(tuple(targets)):
            std = 1.0 / max(1, layer.in_features) ** 0.5
            down = torch.randn(rank, layer.in_features, generator=gen) * std
            up = torch.randn(layer.out_features, rank, generator=gen) * std
            state[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
            state[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    return state
