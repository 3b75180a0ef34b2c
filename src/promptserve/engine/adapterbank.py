"""Adapters on a device, batched: which LoRA adapters a worker holds in its stacked rows (a
bounded set, least recently used out, loaded from host memory when a call needs one), and the
layer that adds every row's own adapters' deltas in one denoiser call. The files themselves,
and what an adapter is, are ``engine.lora``'s.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from promptserve.engine.lora import Adapter
from promptserve.errors import InputError


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
