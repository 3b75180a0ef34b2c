"""What each simulated request asks for besides its prompt: a size from a mix and an adapter
from a Zipf draw. Both split the approximate cache (a request resumes only from a neighbour of
its own size and adapter set), which is what the simulator models of them: the request's cache
namespace is the server's own (``engine.base.cache_space``), and its size's index (``shape``),
by which the policy times its steps and batches (``sized_profile``: by pixel count)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.cache.spaces import cache_space
from promptserve.engine.base import Look
from promptserve.engine.sizes import Size, parse_size
from promptserve.errors import InputError
from promptserve.profile import Profile, for_adapters, for_sizes
from promptserve.types import Request

# An assumed device-side load of one adapter from host memory (the serving engine measures its
# own at start, ``engine.lora``): an SDXL rank-16 adapter is some 45 MB in half precision over
# several hundred layers, a copy each; tens of milliseconds on a PCIe host.
LORA_LOAD_S = 0.05


@dataclass(frozen=True)
class LookMix:
    sizes: tuple[Size, ...] = ()  # the first is the model's own
    size_weights: tuple[float, ...] = ()
    adapters: int = 0  # how many adapters; 0: none
    zipf: float = 1.0  # adapter i (from 0) drawn with weight 1 / (i + 1) ** zipf
    resident: int = 0  # adapters a GPU holds at once (0: every one, nothing to load)
    load_s: float = LORA_LOAD_S  # seconds one takes to load into a free row


def parse_size_mix(text: str) -> tuple[tuple[Size, ...], tuple[float, ...]]:
    """``1024x1024:0.6,1152x896:0.2,896x1152:0.2``: sizes and their shares (summing to 1)."""
    sizes, weights = [], []
    for part in text.split(","):
        size, _, share = part.partition(":")
        try:
            w = float(share)
        except ValueError:
            raise InputError(f"--size-mix: {part!r} is not SIZE:SHARE") from None
        if not 0 < w <= 1:
            raise InputError(f"--size-mix: the share of {size} must be in (0, 1], got {share}")
        sizes.append(parse_size(size, "--size-mix"))
        weights.append(w)
    if abs(sum(weights) - 1.0) > 1e-6:
        raise InputError(f"--size-mix: the shares sum to {sum(weights):g}, not 1")
    return tuple(sizes), tuple(weights)


def parse_adapters(text: str) -> tuple[int, float, int, float]:
    """``N:ALPHA[:RESIDENT[:LOAD_S]]``: N adapters drawn Zipf(ALPHA) (``N`` alone: ALPHA 1),
    RESIDENT of them held per GPU at once (default every one), LOAD_S seconds a load."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4:
        raise InputError(f"--adapters {text!r} is not N:ALPHA[:RESIDENT[:LOAD_S]] (e.g. 32:1.0:8)")
    try:
        n = int(parts[0])
        a = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
        resident = int(parts[2]) if len(parts) > 2 else 0
        load_s = float(parts[3]) if len(parts) > 3 else LORA_LOAD_S
    except ValueError:
        raise InputError(
            f"--adapters {text!r} is not N:ALPHA[:RESIDENT[:LOAD_S]] (e.g. 32:1.0:8)"
        ) from None
    if n < 0 or a < 0 or resident < 0 or load_s < 0:
        raise InputError(f"--adapters {text!r}: N, ALPHA, RESIDENT and LOAD_S must be >= 0")
    return n, a, resident, load_s


def with_looks(requests: Sequence[Request], mix: LookMix, seed: int) -> list[Request]:
    """The requests, each in its size's and adapter's cache namespace (drawn with ``seed``)."""
    if not mix.sizes and not mix.adapters:
        return list(requests)
    rng = np.random.default_rng(seed + 7_919)
    n = len(requests)
    sizes = rng.choice(len(mix.sizes), n, p=np.asarray(mix.size_weights)) if mix.sizes else None
    adapters = None
    if mix.adapters:
        w = 1.0 / np.arange(1, mix.adapters + 1) ** mix.zipf
        adapters = rng.choice(mix.adapters, n, p=w / w.sum())
    out = []
    for i, r in enumerate(requests):
        size = mix.sizes[sizes[i]] if sizes is not None and sizes[i] > 0 else None
        lora = ((f"adapter{adapters[i]}", 1.0),) if adapters is not None else ()
        space = cache_space(r.tenant, Look(size=size, lora=lora))
        shape = int(sizes[i]) if sizes is not None else 0
        named = (int(adapters[i]) + 1,) if adapters is not None else ()
        out.append(dataclasses.replace(r, tenant=space, shape=shape, adapters=named))
    return out


def sized_profile(profile: Profile, mix: LookMix) -> Profile:
    """``profile`` timing the mix's sizes (the first is the size it was measured at) and its
    adapters' residency."""
    if mix.sizes:
        profile = for_sizes(profile, mix.sizes)
    if mix.adapters and mix.resident and mix.resident < mix.adapters:
        profile = for_adapters(profile, mix.resident, mix.load_s)
    return profile
