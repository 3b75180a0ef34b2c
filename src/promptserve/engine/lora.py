"""LoRA adapters per request, batched: every member of one denoiser call brings its own.

A LoRA adapter adds ``scale * (alpha / r) * B (A x)`` to a linear layer's output. Fusing it into
the weights (diffusers' ``fuse_lora``) serves one adapter per model; here the base weights stay
as they are and each targeted layer adds, for each adapter present in the batch, its low-rank
delta to that adapter's rows only (rows without an adapter add nothing): one denoiser call
serves members with different adapters, as S-LoRA and Punica do for language models. The rows
of a call are the members' (and, with classifier-free guidance, their negative passes too,
which diffusers' fused model also runs through the adapter).

Files: ``NAME.safetensors`` in the diffusers / PEFT layout (``unet.<module>.lora_A.weight``,
``lora_B``; ``transformer.`` for the flow families) or any layout diffusers' own converters
read (kohya's ``lora_unet_...``, with ``.alpha``); read through the family's
``lora_state_dict``. Linear layers of the denoiser only: a file with convolution LoRA or
text-encoder weights is reported by name at start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from promptserve.errors import InputError

MAX_ADAPTERS_PER_REQUEST = 4
SCALE_RANGE = (0.0, 2.0)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREFIX = {"unet": "unet.", "sd3": "transformer.", "flux": "transformer."}
# (down, up) suffix pairs of the layouts diffusers' converters leave
SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


@dataclass
class Adapter:
    """One adapter's low-rank pairs per module of the denoiser: module -> (A, B, alpha / r)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b, _ in self.layers.values()
        )


def _loader(family: str, sdxl: bool):  # noqa: ANN202 - a diffusers LoRA loader mixin class
    from diffusers.loaders import lora_pipeline as lp

    if family == "flux":
        return lp.FluxLoraLoaderMixin
    if family == "sd3":
        return lp.SD3LoraLoaderMixin
    return lp.StableDiffusionXLLoraLoaderMixin if sdxl else lp.StableDiffusionLoraLoaderMixin


def read_adapter(path: Path, family: str, sdxl: bool, model: torch.nn.Module) -> Adapter:
    """An adapter file as (A, B, alpha / r) per module of ``model``; a file whose layout
    diffusers cannot read, whose modules the model lacks, or that carries what is not served
    (convolution LoRA, text-encoder weights) is an error naming the file and why."""
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
    prefix = PREFIX[family]
    alphas = alphas or {}
    other = sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix)})
    if other:
        raise InputError(
            f"LoRA {path.name}: carries weights for {', '.join(other)}; only the denoiser's "
            f"({prefix.rstrip('.')}) are served"
        )
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, down in state.items():
        for d, u in SUFFIXES:
            if key.endswith(d):
                module = key[len(prefix) : -len(d)]
                up = state.get(key[: -len(d)] + u)
                break
        else:
            continue
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
        alpha = alphas.get(prefix + module + ".alpha", alphas.get(module + ".alpha"))
        layers[module] = (down, up, float(alpha) / rank if alpha is not None else 1.0)
    if not layers:
        raise InputError(f"LoRA {path.name}: no LoRA weights for the {prefix.rstrip('.')} found")
    return Adapter(name, layers)


@dataclass
class _Active:
    rows: torch.Tensor  # the call's rows that carry this adapter
    adapter: str
    scale: float


@dataclass
class AdapterBank:
    """The adapters an engine serves, installed in its denoiser: each targeted linear layer is
    wrapped once; which rows carry which adapter is set per call (``active``)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: list[_Active] = field(default_factory=list)
    # per module and adapter: (A, B * alpha / r) on the model's device and dtype
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def install(self, model: torch.nn.Module, adapters: Sequence[Adapter]) -> None:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        for adapter in adapters:
            self.adapters[adapter.name] = adapter
            for module, (a, b, scaling) in adapter.layers.items():
                pair = (a.to(device, dtype), (b * scaling).to(device, dtype))
                self.weights.setdefault(module, {})[adapter.name] = pair
        for module in self.weights:
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, child)
            if not isinstance(layer, LoRALinear):
                setattr(parent, child, LoRALinear(layer, self, module))

    def set_rows(
        self, per_row: Sequence[tuple[tuple[str, float], ...]], device: torch.device
    ) -> None:
        """The adapters of each row of the next call (a member's, repeated for its negative
        pass by the caller); rows with none add nothing."""
        groups: dict[tuple[str, float], list[int]] = {}
        for row, adapters in enumerate(per_row):
            for name, scale in adapters:
                if scale != 0.0:
                    groups.setdefault((name, scale), []).append(row)
        self.active = [
            _Active(torch.tensor(rows, device=device), name, scale)
            for (name, scale), rows in groups.items()
        ]

    def clear(self) -> None:
        self.active = []


@contextmanager
def adapters_on(bank: AdapterBank | None, per_row: Sequence[tuple], device: torch.device):
    """The adapters of each row active for one call (nothing to do without a bank)."""
    if bank is None or not any(per_row):
        yield
        return
    bank.set_rows(per_row, device)
    try:
        yield
    finally:
        bank.clear()


class LoRALinear(torch.nn.Module):
    """A linear layer plus, for each adapter active in this call, its delta on its rows."""

    def __init__(self, base: torch.nn.Linear, bank: AdapterBank, module: str) -> None:
        super().__init__()
        self.base, self.bank, self.module = base, bank, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.bank.active:
            return out
        mine = self.bank.weights.get(self.module, {})
        for act in self.bank.active:
            pair = mine.get(act.adapter)
            if pair is None:
                continue
            a, b = pair
            delta = (x.index_select(0, act.rows) @ a.T) @ b.T
            out = out.index_add(0, act.rows, delta, alpha=act.scale)
        return out


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


def load_dir(folder: Path, family: str, sdxl: bool, model: torch.nn.Module) -> list[Adapter]:
    """Every ``*.safetensors`` of a folder, each checked against the model (errors by name)."""
    return [read_adapter(p, family, sdxl, model) for p in adapter_files(folder)]


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
