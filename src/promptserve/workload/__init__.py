"""Workloads: prompt sources, arrival processes, and the requests they make together."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from promptserve.types import Request
from promptserve.workload.arrivals import (
    ARGUS_GPUS,
    ArrivalSpec,
    RateSegment,
    argus_segments,
    generate_arrivals,
    parse_arrival_spec,
    poisson_arrivals,
    trace_arrivals,
)
from promptserve.workload.prompts import load_prompts


def make_requests(
    prompts: Sequence[str],
    arrivals_s: np.ndarray,
    slo_s: float,
    tenant: str = "default",
) -> list[Request]:
    """Pair arrivals with prompts in file order (the order caching feeds on).

    When there are more arrivals than prompts, the prompts repeat from the top under a new
    tenant per pass (``tenant``, ``tenant/pass2``, ...): a pass then meets the file's own mix of
    near-duplicates instead of exact repeats of the previous pass.
    """
    if not prompts:
        raise ValueError("no prompts")
    n = len(prompts)
    return [
        Request(
            i,
            float(t),
            prompts[i % n],
            tenant if i < n else f"{tenant}/pass{i // n + 1}",
            float(t) + slo_s,
        )
        for i, t in enumerate(arrivals_s)
    ]


__all__ = [
    "ARGUS_GPUS",
    "ArrivalSpec",
    "RateSegment",
    "argus_segments",
    "generate_arrivals",
    "load_prompts",
    "make_requests",
    "parse_arrival_spec",
    "poisson_arrivals",
    "trace_arrivals",
]
