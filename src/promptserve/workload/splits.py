"""Tune and held-out splits, and seeds that pick different runs of fixed data.

A rule fitted on some requests proves little on those same requests, so the data is cut in
two and every figure the docs lead with comes from the half no constant was chosen on:

* ``tune``: the first half of the prompt file and the first half of an arrival trace's span;
  Poisson seeds as given. The constants of ``policy/step`` were chosen here.
* ``held-out``: the second half of each; Poisson seeds + ``HELD_OUT_SEED`` (so no tune run's
  draws recur).
* ``all``: the whole file and trace (what ``simulate`` and ``sweep`` run by default).

A trace and a prompt file are fixed data, so a seed alone would repeat one run. Seed s picks
where the replay starts: at ``phase(s)`` of the way through the split's prompts (rotated, so
neighbouring lines stay neighbours) and through its trace span (which loops within the split).
``phase`` is the fractional part of s times the golden ratio's conjugate: 0 for seed 0 (the
file's own order, the trace from its start), and for seeds 1, 2, 3 the points 0.618, 0.236,
0.854, as far apart as any three phases drawn one after another can be.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

from promptserve.errors import InputError

Split = Literal["all", "tune", "held-out"]
SPLITS: tuple[str, ...] = get_args(Split)
HELD_OUT_SEED = 1000  # Poisson seeds of the held-out split start here
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def check_split(name: str) -> Split:
    if name not in SPLITS:
        raise InputError(f"--split {name!r} is not one of: {', '.join(SPLITS)}")
    return name  # type: ignore[return-value]


def phase(seed: int) -> float:
    """Where seed ``seed`` starts a replay, as a share of the data (0 <= phase < 1)."""
    return (seed * GOLDEN) % 1.0


def prompt_order(count: int, split: Split, seed: int) -> np.ndarray:
    """Indices into a prompt file of ``count`` prompts: the split's half, rotated by the seed."""
    half = count // 2
    if split == "all":
        lo, n = 0, count
    else:
        lo, n = (0, half) if split == "tune" else (half, count - half)
    if n <= 0:
        raise InputError(f"the prompt file has {count} prompt(s): too few to split")
    return lo + np.roll(np.arange(n), -int(phase(seed) * n))


def trace_window(offsets_s: np.ndarray, split: Split) -> np.ndarray:
    """The split's half of a trace (offsets from its first arrival), rebased to start at 0."""
    if split == "all":
        return offsets_s
    half = len(offsets_s) // 2
    part = offsets_s[:half] if split == "tune" else offsets_s[half:]
    if len(part) < 2:
        raise InputError(f"the trace has {len(offsets_s)} arrival(s): too few to split")
    return part - part[0]


def arrival_seed(split: Split, seed: int) -> int:
    """The seed a random arrival process draws with in this split."""
    return seed + HELD_OUT_SEED if split == "held-out" else seed
