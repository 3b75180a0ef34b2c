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
import time
from collections import OrderedDict
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


@dataclass
class _Slot:
    """One adapter slot of a call: each row's adapter in it (0: none) and its scale."""

    ids: torch.Tensor  # (rows,) long: index into a layer's stacked adapters
    scales: torch.Tensor  # (rows,) in the model's dtype


@dataclass
class Residency:
    """What a bank's resident set did: loads into a slot, hits, evictions (the metrics)."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    load_s: float = 0.0  # seconds the loads took, together


@dataclass
class AdapterBank:
    """The adapters an engine serves, installed in its denoiser: each targeted linear layer is
    wrapped once and holds the resident adapters' pairs stacked, ranks zero-padded to the
    largest (row 0: no adapter, all zeros). Every adapter's rows are kept in host memory (read
    once, at start); the device holds ``capacity`` of them, least recently used out, loaded
    into a free row when a call needs one (a copy from host memory: no file is read while
    serving). A call sets each row's adapters (``set_rows``); a layer then gathers each row's
    pair and runs two batched matmuls per adapter slot, however many distinct adapters the
    batch holds (S-LoRA's gather, without its custom kernels)."""

    capacity: int = 8  # adapters resident on the device at once
    max_bytes: int | None = None  # and at most this many device bytes of their rows
    adapters: dict[str, Adapter] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)  # resident adapter -> its row (1..)
    slots: list[_Slot] = field(default_factory=list)  # set per call
    # module -> (A stack (capacity + 1, r, in), B stack (capacity + 1, out, r)), B * alpha / r
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    host: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    lru: OrderedDict = field(default_factory=OrderedDict)  # resident names, oldest first
    stats: Residency = field(default_factory=Residency)
    load_s: float = 0.0  # one load, as measured at install
    # private (``serve --lora-private``): a joining member's adapters are copied in afresh
    # even where resident (``refresh``), so every join pays the same load whoever used them
    private: bool = False

    def carries(self, name: str) -> bool:
        """Whether adapter ``name`` has weights in this bank's part."""
        return name in self.host

    def slot_bytes(self) -> int:
        """Device bytes one resident adapter takes (its rows of every stack)."""
        return sum(
            (a[0].numel() + b[0].numel()) * a.element_size() for a, b in self.stacks.values()
        )

    def resident(self, name: str, busy: set[str] = frozenset()) -> int:  # type: ignore[assignment]
        """``name``'s row, loading it (over the least recently used adapter not in ``busy``,
        the rows of the call being set up) when it is not resident."""
        row = self.index.get(name)
        if row is not None:
            self.lru.move_to_end(name)
            self.stats.hits += 1
            return row
        t0 = time.perf_counter()
        if len(self.index) < self.capacity:
            row = len(self.index) + 1
        else:
            victim = next((n for n in self.lru if n not in busy), None)
            if victim is None:
                raise RuntimeError(
                    f"a call needs more than {self.capacity} distinct adapters at once "
                    "(--lora-resident)"
                )
            row = self.index.pop(victim)
            del self.lru[victim]
            self.stats.evictions += 1
        self._copy_in(name, row)
        self.index[name] = row
        self.lru[name] = None
        self.stats.loads += 1
        self.stats.load_s += time.perf_counter() - t0
        return row

    def _copy_in(self, name: str, row: int) -> None:
        """``name``'s pairs into ``row`` of every stack, from host memory."""
        for module, (a_stack, b_stack) in self.stacks.items():
            a_host, b_host = self.host[name].get(module, (None, None))
            if a_host is None:
                a_stack[row].zero_(), b_stack[row].zero_()
            else:
                a_stack[row].copy_(a_host, non_blocking=True)
                b_stack[row].copy_(b_host, non_blocking=True)

    def refresh(self, names: set[str]) -> None:
        """Members join naming ``names`` (private banks only): each resident one is copied in
        again, as a load (the same data over its own row, so members running with it see no
        change); one not resident loads at the next call, as it would anyway. Every join then
        pays one load per adapter, whoever used it before."""
        if not self.private:
            return
        for name in sorted(n for n in names if n in self.index):
            t0 = time.perf_counter()
            self._copy_in(name, self.index[name])
            self.lru.move_to_end(name)
            self.stats.loads += 1
            self.stats.load_s += time.perf_counter() - t0

    def install(self, model: torch.nn.Module, part: str, adapters: Sequence[Adapter]) -> None:
        """Wrap ``model``'s layers that ``adapters`` adapt in ``part``; adapters without
        weights there are not this bank's (a row carrying one adds nothing here)."""
        param = next(model.parameters())
        for adapter in adapters:
            if adapter.parts.get(part):
                self.adapters[adapter.name] = adapter
        modules = sorted({m for a in self.adapters.values() for m in a.parts[part]})
        if self.max_bytes is not None:  # the rows one resident adapter takes, every layer
            per = param.element_size() * sum(
                max(a.parts[part][m][0].shape[0] for a in self.adapters.values()
                    if m in a.parts[part])
                * (_linear(model, m).in_features + _linear(model, m).out_features)
                for m in modules
            )  # fmt: skip
            if per > self.max_bytes:
                raise InputError(
                    f"--lora-resident-bytes {self.max_bytes}: one adapter's rows take {per} "
                    f"bytes in the {part}; give at least that"
                )
            self.capacity = min(self.capacity, self.max_bytes // per)
        count = min(self.capacity, len(self.adapters)) + 1
        self.host = {name: {} for name in self.adapters}
        pin = param.device.type == "cuda"  # pinned host rows: the copy overlaps the GPU's work
        for module in modules:
            layer = model.get_submodule(module)
            base = layer.base if isinstance(layer, LoRALinear) else layer
            pairs = {
                a.name: a.parts[part][module] for a in self.adapters.values()
                if module in a.parts[part]
            }  # fmt: skip
            rank = max(down.shape[0] for down, _, _ in pairs.values())
            for name, (down, up, scaling) in pairs.items():
                a_row = torch.zeros(rank, base.in_features)
                b_row = torch.zeros(base.out_features, rank)
                a_row[: down.shape[0]] = down.float()
                b_row[:, : down.shape[0]] = up.float() * scaling
                a_row, b_row = a_row.to(param.dtype), b_row.to(param.dtype)
                self.host[name][module] = (a_row.pin_memory(), b_row.pin_memory()) if pin else (
                    a_row, b_row
                )  # fmt: skip
            self.stacks[module] = (
                torch.zeros(count, rank, base.in_features, device=param.device, dtype=param.dtype),
                torch.zeros(count, base.out_features, rank, device=param.device, dtype=param.dtype),
            )
            if not isinstance(layer, LoRALinear):
                parent_name, _, child = module.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, LoRALinear(layer, self, module))
        self.index, self.lru = {}, OrderedDict()
        for name in list(self.adapters)[: self.capacity]:  # the first ones resident from start
            self.resident(name)
        # one load as measured at start: what the policy counts a load as (``residency``)
        self.load_s = self.stats.load_s / max(self.stats.loads, 1)
        self.stats = Residency()

    def set_rows(
        self, per_row: Sequence[tuple[tuple[str, float], ...]], device: torch.device
    ) -> None:
        """The adapters of each row of the next call (a member's, repeated for its negative
        pass by the caller); rows with none add nothing."""
        per_row = [tuple(a for a in adapters if a[0] in self.host) for adapters in per_row]
        busy = {a[0] for adapters in per_row for a in adapters}
        rows = {name: self.resident(name, busy) for name in sorted(busy)}
        depth = max(len(adapters) for adapters in per_row)
        dtype = next(iter(self.stacks.values()))[0].dtype if self.stacks else torch.float32
        self.slots = []
        for slot in range(depth):
            ids = [rows[a[slot][0]] if slot < len(a) else 0 for a in per_row]
            scales = [a[slot][1] if slot < len(a) else 0.0 for a in per_row]
            self.slots.append(
                _Slot(
                    torch.tensor(ids, device=device),
                    torch.tensor(scales, device=device, dtype=dtype),
                )
            )

    def clear(self) -> None:
        self.slots = []


def _linear(model: torch.nn.Module, module: str) -> torch.nn.Linear:
    layer = model.get_submodule(module)
    return layer.base if isinstance(layer, LoRALinear) else layer


class LoRALinear(torch.nn.Module):
    """A linear layer plus each row's adapters' deltas: per slot, the row's A and B gathered
    from the stack, two batched matmuls, scaled per row (rows without one gather zeros)."""

    def __init__(self, base: torch.nn.Linear, bank: AdapterBank, module: str) -> None:
        super().__init__()
        self.base, self.bank, self.module = base, bank, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.bank.slots:
            return out
        a_stack, b_stack = self.bank.stacks[self.module]
        flat = x if x.dim() == 3 else x.unsqueeze(1)  # (rows, tokens, in)
        acc = out if out.dim() == 3 else out.unsqueeze(1)
        for slot in self.bank.slots:
            a = a_stack.index_select(0, slot.ids)  # (rows, r, in)
            b = b_stack.index_select(0, slot.ids)  # (rows, out, r)
            low = torch.bmm(flat, a.transpose(1, 2)) * slot.scales.view(-1, 1, 1)  # rank-wide
            acc = torch.baddbmm(acc, low, b.transpose(1, 2))  # the add fused into the matmul
        return acc if x.dim() == 3 else acc.squeeze(1)


def refresh_on_join(banks: Sequence[AdapterBank | None], looks: Sequence | None) -> None:
    """Members join with ``looks``: a private bank copies their adapters in afresh."""
    names = {name for look in looks or () for name, _ in look.lora}
    for bank in banks:
        if bank is not None and names:
            bank.refresh(names)


@contextmanager
def adapters_on(bank: AdapterBank | None, per_row: Sequence[tuple], device: torch.device):
    """The adapters of each row active for one call (nothing to do without a bank)."""
    if bank is None or not bank.stacks or not any(per_row):
        yield
        return
    bank.set_rows(per_row, device)
    if not bank.slots:
        yield
        return
    try:
        yield
    finally:
        bank.clear()


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


def residency(engine) -> tuple[int, float, bool]:  # noqa: ANN001 - any engine
    """(adapters its device holds at once, seconds a load took at start, whether every join
    loads its adapters) where adapters are loaded while serving: it serves more than it holds,
    or is private; (0, 0.0, False) where every adapter stays resident and nothing loads."""
    c = getattr(engine, "c", None)
    bank = getattr(c, "lora_bank", None)
    if bank is None or (len(bank.host) <= bank.capacity and not bank.private):
        return 0, 0.0, False
    return bank.capacity, bank.load_s, bank.private


def residency_stats(engines) -> dict[str, int]:  # noqa: ANN001 - engines
    """Loads, hits (calls that found an adapter resident) and evictions, over ``engines``'
    denoiser banks (each engine counted once)."""
    out = {"loads": 0, "hits": 0, "evictions": 0}
    for engine in {id(e): e for e in engines}.values():
        bank = getattr(getattr(engine, "c", None), "lora_bank", None)
        if bank is not None:
            out["loads"] += bank.stats.loads
            out["hits"] += bank.stats.hits
            out["evictions"] += bank.stats.evictions
    return out
