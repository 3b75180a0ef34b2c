"""promptserve's planner: allocation and redirection solved together, exactly, under the SLO.

One MILP over GPU groups p (GPUs with the same profile), levels l and K_opt classes i:

    maximise   sum_{i,l} q[i,l] x[i,l]
    s.t.       sum_l n[p,l] = G_p                          (every GPU gets one level)
               sum_l x[i,l] + r[i] = lambda_i               (each class is served or refused)
               sum_i x[i,l] <= sum_p T[p,l] n[p,l]          (level capacity under the SLO)
               n integer >= 0, x, r >= 0

q is the per-prompt quality model (a class served above its K_opt pays its own penalty), not a
per-level average; T is the SLO capacity of ``capacity.py`` (batching and queueing delay
included), so a level that cannot meet the SLO gets nothing; r (refusal, quality 0) is used
only when no allocation can serve the load in time. GPUs that carry no planned load then move to
their group's fastest level: the same quality with the most headroom for a burst. Grouping identical GPUs keeps the problem the same size
at 8 or 512 GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from promptserve.policy.allocation import spare_to_fastest
from promptserve.policy.capacity import slo_batch, slo_capacity_qpm
from promptserve.policy.solver import maximise
from promptserve.policy.types import Demand, Plan
from promptserve.profile import Profile


def group_gpus(profiles: Sequence[Profile]) -> list[tuple[Profile, list[int]]]:
    groups: dict[str, tuple[Profile, list[int]]] = {}
    for i, p in enumerate(profiles):
        groups.setdefault(p.name, (p, []))[1].append(i)
    return list(groups.values())


def plan_joint(
    demand: Demand,
    profiles: Sequence[Profile],
    quality: np.ndarray,
    slo_s: float,
    max_batch: int,
    current: Sequence[int | None] | None = None,
) -> Plan:
    """The exact joint plan; ``quality[i, l]`` is q(K_opt = levels[i], K = levels[l]) in percent."""
    levels = profiles[0].levels
    m = len(levels)
    groups = group_gpus(profiles)
    t = np.array([[slo_capacity_qpm(p, k, slo_s, max_batch) for k in levels] for p, _ in groups])
    lam = demand.per_class_qpm()
    n_vars = len(groups) * m
    x0, r0 = n_vars, n_vars + m * m
    size = r0 + m
    c = np.zeros(size)
    c[x0:r0] = np.asarray(quality, dtype=float).ravel()
    a_eq = np.zeros((len(groups) + m, size))
    b_eq = np.zeros(len(groups) + m)
    for g, (_, members) in enumerate(groups):
        a_eq[g, g * m : (g + 1) * m] = 1.0
        b_eq[g] = len(members)
    for i in range(m):
        a_eq[len(groups) + i, x0 + i * m : x0 + (i + 1) * m] = 1.0
        a_eq[len(groups) + i, r0 + i] = 1.0
        b_eq[len(groups) + i] = lam[i]
    a_ub = np.zeros((m, size))
    for level in range(m):
        a_ub[level, x0 + level : r0 : m] = 1.0
        for g in range(len(groups)):
            a_ub[level, g * m + level] = -t[g, level]
    integer = np.zeros(size)
    integer[:n_vars] = 1
    sol = maximise(c, a_ub, np.zeros(m), a_eq, b_eq, integer)
    counts = np.rint(sol.x[:n_vars]).astype(int).reshape(len(groups), m)
    flows = sol.x[x0:r0].reshape(m, m)
    counts = _spare_to_fastest(counts, flows.sum(axis=0), t)
    refused = sol.x[r0:]
    gpu_levels = assign_levels(groups, counts, levels, current)
    cap = (t * counts).sum(axis=0)
    route = route_rows(flows, quality, cap)
    total = lam.sum()
    served_q = float((flows * quality).sum())
    return Plan(
        levels=levels,
        gpu_levels=gpu_levels,
        route=route,
        refuse=tuple(float(r / lam[i]) if lam[i] > 0 else 0.0 for i, r in enumerate(refused)),
        capacity_qpm=tuple(float(v) for v in cap),
        expected_quality=served_q / total if total > 0 else 100.0,
        batch=tuple(max(slo_batch(groups[0][0], k, slo_s, max_batch), 1) for k in levels),
    )


def _spare_to_fastest(counts: np.ndarray, level_load: np.ndarray, t: np.ndarray) -> np.ndarray:
    """GPUs that carry no planned load go to their group's fastest level (more headroom, same
    quality). Groups are filled in order of their capacity at each level."""
    out = np.zeros_like(counts)
    left = level_load.astype(float).copy()
    for g in np.argsort(-t.max(axis=1)):
        share = np.minimum(left, counts[g] * t[g])
        out[g] = spare_to_fastest(counts[g], share, t[g])
        left -= np.minimum(share, out[g] * t[g])
    return out


def route_rows(
    flows: np.ndarray, quality: np.ndarray, capacity: np.ndarray
) -> tuple[tuple[float, ...], ...]:
    """P(K_opt -> K) from the flows; a class with no planned flow goes to its best level with capacity."""
    rows = []
    for i in range(len(flows)):
        total = flows[i].sum()
        if total > 1e-9:
            rows.append(tuple(float(v / total) for v in flows[i]))
            continue
        usable = capacity > 0
        best = int(np.argmax(np.where(usable, quality[i], -np.inf))) if usable.any() else i
        rows.append(tuple(float(j == best) for j in range(len(flows))))
    return tuple(rows)


def assign_levels(
    groups: list[tuple[Profile, list[int]]],
    counts: np.ndarray,
    levels: tuple[int, ...],
    current: Sequence[int | None] | None,
) -> tuple[int | None, ...]:
    """Concrete GPUs for the counts, keeping each GPU's current level where the plan allows."""
    n = sum(len(members) for _, members in groups)
    out: list[int | None] = [None] * n
    for g, (_, members) in enumerate(groups):
        want = {k: int(c) for k, c in zip(levels, counts[g], strict=True)}
        rest = []
        for gpu in members:
            k = current[gpu] if current is not None else None
            if k is not None and want.get(k, 0) > 0:
                out[gpu] = k
                want[k] -= 1
            else:
                rest.append(gpu)
        spare = [k for k in levels for _ in range(want[k])]
        for gpu, k in zip(rest, spare, strict=True):
            out[gpu] = k
    return tuple(out)
