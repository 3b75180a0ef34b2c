"""A share of the workload's requests as edits (``--edits SHARE:LO-HI``): each drawn with a
strength uniform in [LO, HI], so that mixed traffic is planned and measured on both clocks.
An edit's prompt stays as drawn (it is what the edit asks for); its image is its own, so the
simulator looks up no neighbour for it and caches nothing of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.errors import InputError
from promptserve.types import Request


@dataclass(frozen=True)
class EditMix:
    share: float  # of the requests, in [0, 1]
    lo: float  # strengths, uniform in [lo, hi], each in (0, 1]
    hi: float


def parse_edits(text: str, flag: str = "--edits") -> EditMix:
    """``0.3:0.3-0.8``: 30% of requests are edits at strength uniform in [0.3, 0.8]; a single
    strength (``0.3:0.6``) gives every edit that one."""
    share, sep, span = text.partition(":")
    lo, _, hi = span.partition("-")
    try:
        mix = EditMix(float(share), float(lo), float(hi or lo))
    except ValueError:
        raise InputError(
            f"{flag} {text!r} is not SHARE:STRENGTH_LO-STRENGTH_HI (e.g. 0.3:0.3-0.8)"
        ) from None
    if not sep:
        raise InputError(f"{flag} {text!r} is not SHARE:STRENGTH_LO-STRENGTH_HI (e.g. 0.3:0.3-0.8)")
    if not 0.0 <= mix.share <= 1.0:
        raise InputError(f"{flag}: SHARE must be in [0, 1], got {share}")
    if not 0.0 < mix.lo <= mix.hi <= 1.0:
        raise InputError(f"{flag}: strengths must satisfy 0 < LO <= HI <= 1, got {span!r}")
    return mix


def with_edits(requests: Sequence[Request], mix: EditMix | None, seed: int) -> list[Request]:
    """The requests, a share of them edits (drawn with ``seed``, apart from the other draws)."""
    if mix is None or mix.share <= 0.0:
        return list(requests)
    rng = np.random.default_rng(seed + 104_729)
    n = len(requests)
    chosen = rng.random(n) < mix.share
    strengths = rng.uniform(mix.lo, mix.hi, n)
    return [
        dataclasses.replace(r, strength=round(float(s), 4)) if edit else r
        for r, edit, s in zip(requests, chosen, strengths, strict=True)
    ]
