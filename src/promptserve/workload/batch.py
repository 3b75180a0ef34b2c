"""A background stream beside the interactive requests (``--batch SHARE:DEADLINE_S``): bulk
jobs (``priority: batch``) that make up SHARE of all the requests, submitted at an even pace
over the interactive requests' span, each with DEADLINE_S to finish, under a tenant of their
own (tenants never share cache entries, so the stream neither feeds nor starves the
interactive requests' cache). Their prompts are the pool's next ones after the interactive
requests': a catalogue of its own, not repeats of what people ask."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.errors import InputError
from promptserve.types import Request

TENANT = "batch"


@dataclass(frozen=True)
class BatchMix:
    share: float  # of all the requests, in [0, 1)
    deadline_s: float  # each job's, from its submission


def parse_batch(text: str, flag: str = "--batch") -> BatchMix:
    """``0.4:3600``: 40% of all requests are background jobs, each due an hour after it is
    submitted."""
    share, sep, deadline = text.partition(":")
    try:
        mix = BatchMix(float(share), float(deadline))
    except ValueError:
        raise InputError(f"{flag} {text!r} is not SHARE:DEADLINE_S (e.g. 0.4:3600)") from None
    if not sep:
        raise InputError(f"{flag} {text!r} is not SHARE:DEADLINE_S (e.g. 0.4:3600)")
    if not 0.0 <= mix.share < 1.0:
        raise InputError(f"{flag}: SHARE must be in [0, 1), got {share}")
    if not mix.deadline_s > 0:
        raise InputError(f"{flag}: DEADLINE_S must be > 0 seconds, got {deadline}")
    return mix


def with_batch(
    requests: Sequence[Request], mix: BatchMix | None, prompts: Sequence[str], seed: int
) -> list[Request]:
    """The requests with the background stream merged in, in arrival order, ids renumbered to
    their position (a run's records are indexed by id). The jobs are spread evenly over the
    interactive span, each shifted by up to half a gap (drawn with ``seed``)."""
    if mix is None or mix.share <= 0.0 or not requests:
        return list(requests)
    n = round(len(requests) * mix.share / (1.0 - mix.share))
    first, last = requests[0].arrival_s, requests[-1].arrival_s
    gap = (last - first) / max(n, 1)
    rng = np.random.default_rng(seed + 7_919)
    times = first + gap * (np.arange(n) + 0.5 + rng.uniform(-0.5, 0.5, n))
    pool = len(prompts)
    background = [
        Request(
            0,
            float(t),
            prompts[(len(requests) + j) % pool],
            TENANT,
            float(t) + mix.deadline_s,
            batch=True,
        )  # fmt: skip
        for j, t in enumerate(times)
    ]
    merged = sorted([*requests, *background], key=lambda r: (r.arrival_s, r.batch))
    return [dataclasses.replace(r, id=i) for i, r in enumerate(merged)]
