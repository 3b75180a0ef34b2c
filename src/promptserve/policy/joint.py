"""promptserve's planner: allocation and redirection solved together, exactly, under the SLO.

One MILP over GPU groups p (GPUs with the same profile), levels l and K_opt classes i:

    maximise   sum_{i,l} q[i,l] x[i,l]
    s.t.       sum_l n[p,l] = G_p                          (every GPU gets one level)
               sum_l x[i,l] + r[i] = lambda_i               (each class is served or refused)
               sum_i x[i,l] <= sum_p C_p,l(n[p,l])          (level capacity under the SLO)
               n integer >= 0, x, r >= 0

q is the per-prompt quality model (a class served above its K_opt pays its own penalty), not a
per-level average; C is the SLO capacity of ``capacity.py`` (batching and queueing delay
included, a lone GPU on a level discounted against GPUs that pool one queue; two binaries per
group and level make it exact), so a level that cannot meet the SLO gets nothing; r (refusal,
quality 0) is used only when no allocation can serve the load in time. GPUs that carry no
planned load then move to their group's fastest level: the same quality with the most headroom
for a burst. Grouping identical GPUs keeps the problem the same size at 8 or 512 GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from promptserve.policy.capacity import (
    POOLED_UTILISATION,
    SINGLE_UTILISATION,
    level_capacity_qpm,
    slo_batch,
    slo_throughput_qpm,
)
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
    t = np.array([[slo_throughput_qpm(p, k, slo_s, max_batch) for k in levels] for p, _ in groups])
    lp = _JointMilp(len(groups), m, [len(members) for _, members in groups])
    sol = maximise(*lp.problem(np.asarray(quality, float), demand.per_class_qpm(), t))
    counts = np.rint(sol.x[lp.n]).astype(int).reshape(len(groups), m)
    flows = sol.x[lp.x].reshape(m, m)
    refused = sol.x[lp.r]

    def capacity(g: int, lv: int, n: int) -> float:  # n GPUs of group g at levels[lv]
        return level_capacity_qpm(groups[g][0], levels[lv], slo_s, max_batch, n)

    counts = _spare_groups_to_fastest(counts, flows.sum(axis=0), capacity, t)
    gpu_levels = assign_levels(groups, counts, levels, current)
    cap = np.array(
        [sum(capacity(g, lv, int(counts[g, lv])) for g in range(len(groups))) for lv in range(m)]
    )
    route = route_rows(flows, quality, cap)
    lam = demand.per_class_qpm()
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


class _JointMilp:
    """Column layout and rows of the MILP. Per group p and level l: n (GPUs, integer), and two
    binaries, a = [n >= 1] and b = [n >= 2], so that the level's capacity is exactly
    ``level_capacity_qpm``: T (U_pool n - (U_pool - U_single)(a - b)), U_single for a lone GPU."""

    def __init__(self, n_groups: int, m: int, sizes: list[int]) -> None:
        self.g, self.m, self.sizes = n_groups, m, sizes
        k = n_groups * m
        self.n = np.arange(k)
        self.a = k + np.arange(k)
        self.b = 2 * k + np.arange(k)
        self.x = 3 * k + np.arange(m * m)
        self.r = 3 * k + m * m + np.arange(m)
        self.size = 3 * k + m * m + m

    def problem(self, quality: np.ndarray, lam: np.ndarray, t: np.ndarray):
        g, m, size = self.g, self.m, self.size
        c = np.zeros(size)
        c[self.x] = quality.ravel()
        a_eq = np.zeros((g + m, size))
        b_eq = np.zeros(g + m)
        for p in range(g):
            a_eq[p, self.n[p * m : (p + 1) * m]] = 1.0
            b_eq[p] = self.sizes[p]
        for i in range(m):
            a_eq[g + i, self.x[i * m : (i + 1) * m]] = 1.0
            a_eq[g + i, self.r[i]] = 1.0
            b_eq[g + i] = lam[i]
        rows: list[np.ndarray] = []
        rhs: list[float] = []
        drop = POOLED_UTILISATION - SINGLE_UTILISATION
        for lv in range(m):
            row = np.zeros(size)
            row[self.x[lv::m]] = 1.0
            for p in range(g):
                j = p * m + lv
                row[self.n[j]] = -POOLED_UTILISATION * t[p, lv]
                row[self.a[j]] = drop * t[p, lv]
                row[self.b[j]] = -drop * t[p, lv]
            rows.append(row)
            rhs.append(0.0)
        for p in range(g):
            for lv in range(m):
                j = p * m + lv
                for coef, limit in self._indicator_rows(j, self.sizes[p]):
                    row = np.zeros(size)
                    for col, v in coef:
                        row[col] = v
                    rows.append(row)
                    rhs.append(limit)
        integer = np.zeros(size)
        integer[: 3 * g * m] = 1
        upper = np.full(size, np.inf)
        upper[self.a] = upper[self.b] = 1.0
        return c, np.array(rows), np.array(rhs), a_eq, b_eq, integer, upper

    def _indicator_rows(self, j: int, gpus: int):
        """a <= n, 2 b <= n, b <= a and n <= a + (G - 1) b: n = 0 leaves a = b = 0, n = 1
        forces a = 1 with b = 0 (the lone-GPU discount), n >= 2 forces b = 1."""
        n, a, b = self.n[j], self.a[j], self.b[j]
        return [
            (((a, 1.0), (n, -1.0)), 0.0),
            (((b, 2.0), (n, -1.0)), 0.0),
            (((b, 1.0), (a, -1.0)), 0.0),
            (((n, 1.0), (a, -1.0), (b, -float(gpus - 1))), 0.0),
        ]


def _spare_groups_to_fastest(
    counts: np.ndarray, level_load: np.ndarray, capacity: Callable[[int, int, int], float], t
) -> np.ndarray:
    """Each group keeps, per level, the fewest GPUs that carry its share of the planned load;
    the rest go to the group's fastest level (the same quality, the most headroom for a burst).
    Groups are filled in order of their capacity."""
    out = np.zeros_like(counts)
    left = level_load.astype(float).copy()
    for g in np.argsort(-t.max(axis=1)):
        for lv in range(counts.shape[1]):
            have = int(counts[g, lv])
            need = next((n for n in range(have + 1) if capacity(g, lv, n) >= left[lv] - 1e-9), have)
            out[g, lv] = need
            left[lv] = max(left[lv] - capacity(g, lv, need), 0.0)
        out[g, int(np.argmax(t[g]))] += int(counts[g].sum() - out[g].sum())
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
