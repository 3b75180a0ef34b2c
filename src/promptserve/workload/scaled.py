"""A trace scaled up to a large cluster: many independent copies of one service's arrivals.

Compressing a trace in time to a thousand times its rate would make its bursts a thousand
times shorter. A large cluster instead serves many services, each bursty on its own clock:
here each copy is the trace stretched to the per-copy rate, started at its own random phase
(it loops), and is one tenant with its own walk through the prompt file. The sum keeps each
tenant's burst shape; the cluster sees them overlap as a real fleet would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.errors import InputError
from promptserve.types import Request
from promptserve.workload.arrivals import trace_arrivals


def superposed_arrivals(
    offsets_s: np.ndarray, copies: int, rate_qpm_each: float, minutes: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times (sorted) and the copy each belongs to, for ``copies`` copies of the trace
    at ``rate_qpm_each`` each, every copy at a random phase of the looping trace."""
    if copies < 1:
        raise InputError(f"copies must be >= 1, got {copies}")
    if minutes <= 0:
        raise InputError(f"minutes must be > 0, got {minutes}")
    base = trace_arrivals(offsets_s, rate_qpm_each, None)
    period = float(base[-1]) * len(base) / max(len(base) - 1, 1)
    loops = int(np.ceil(minutes * 60.0 / period)) + 1
    looped = np.concatenate([base + i * period for i in range(loops)])
    rng = np.random.default_rng(seed)
    times, owner = [], []
    for c in range(copies):
        t = looped - rng.uniform(0.0, period)
        t = t[(t >= 0.0) & (t < minutes * 60.0)]
        times.append(t)
        owner.append(np.full(len(t), c, dtype=np.int64))
    all_t, all_c = np.concatenate(times), np.concatenate(owner)
    order = np.argsort(all_t, kind="stable")
    return all_t[order], all_c[order]


def tenant_requests(
    prompts: Sequence[str],
    times_s: np.ndarray,
    copy_of: np.ndarray,
    slo_s: float,
    seed: int,
    prefix: str = "svc",
) -> tuple[list[Request], np.ndarray]:
    """One tenant per copy (``svc0``, ``svc1``, ...), each walking the prompt file in order
    from its own random start; returns the requests and each one's row in ``prompts``."""
    if not prompts:
        raise InputError("no prompts")
    n = len(prompts)
    copies = int(copy_of.max()) + 1 if len(copy_of) else 0
    start = np.random.default_rng(seed + 1).integers(0, n, max(copies, 1))
    seen = np.zeros(max(copies, 1), dtype=np.int64)
    rows = np.empty(len(times_s), dtype=np.int64)
    requests = []
    for i, (t, c) in enumerate(zip(times_s, copy_of, strict=True)):
        row = int((start[c] + seen[c]) % n)
        seen[c] += 1
        rows[i] = row
        requests.append(Request(i, float(t), prompts[row], f"{prefix}{int(c)}", float(t) + slo_s))
    return requests, rows


@dataclass(frozen=True)
class Rows:
    """Embeddings by reference: request i's row is ``base[rows[i]]``. A scaled-up workload
    repeats a few thousand prompts over hundreds of thousands of requests; a copy per request
    would take gigabytes."""

    base: np.ndarray
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.base.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> np.ndarray:
        return self.base[self.rows[index]]
