"""An offline bound: the whole trace known in advance, solved as one LP over fine time slots.

No schedule can beat it. Take any schedule the simulator (or a real cluster) could run: every
batch of b images at level l on a GPU of group p occupies that GPU for L_p(l, b) seconds, and
every step-level iteration of n members for s_p(n) seconds (plus each member's join and leave),
from no earlier than the arrival of each member to, for a member answered in time, no later
than its deadline. Then:

1. *Cost.* A member answered in time at level l on group p used at least c[p, l, W] GPU-seconds,
   W its window (deadline - arrival): the less of
   - *as a batch member*: min_b L_p(l, b) / b over batches that fit (L_p(l, b) <= W), its share
     of the batch's time;
   - *as a step-level member*: its N - K_l steps, each in an iteration of some n members, cost
     it s_p(n) seconds of its window and give it s_p(n) / n of the GPU's; over every sequence
     of counts whose seconds fit W (less its join and leave), the GPU's share is at least the
     two-row LP's optimum (steps; seconds) plus the join and leave (``step_cost``). Members
     mixing counts can beat every batch that fits (a window that a batch of 8 fits and one of
     9 does not lets some steps run with 9), so the batch cost alone is no bound for them.
2. *Time.* Cut time into slots of ``window_s`` seconds. That share lies inside the batch's
   interval, hence inside the member's [arrival, deadline], hence in the slots that interval
   overlaps (from the arrival's slot to the deadline's: nothing spills past the deadline's
   slot).
3. *Capacity.* In one slot the G_p GPUs of group p give at most G_p x window_s GPU-seconds.

So the schedule's counts y[request bucket, level, group] (buckets: requests with the same K_opt
class, arrival slot and deadline slot) and the shares z[window, slot, group] they spread over
their slots satisfy the constraints below, and its effective quality is at most the LP's
optimum. Quality uses the K_opt every request would have with every earlier prompt of its
tenant cached from the soonest that prompt could have been answered (``earliest_answer_s``
after its arrival: no schedule caches a prompt before it finishes, and every policy looks its
neighbour up at arrival; ``compare.oracle_neighbours``): at least the K_opt any policy sees,
and quality does not fall with K_opt. A request with no such earlier prompt has no neighbour
under any schedule, so it runs from noise: its bucket may only use level 0.

    maximise   sum q[i, l] y[b, l, p] / N          (i: the bucket's K_opt class)
    s.t.       sum_{l, p} y[b, l, p]               <= n_b               (each bucket's requests)
               sum_{b in w, l} c[p, l, W_b] y[b, l, p] <= sum_t z[w, t, p]  (work over slots)
               sum_w z[w, t, p]                    <= G_p window_s      (GPU time per slot)
               y, z >= 0;  y[b, l, p] = 0 unless level l fits the bucket's window alone,
                           and unless l = 0 for a bucket of requests with no neighbour

*Feature caching and sizes.* With intervals offered (``interval_q``) a column is a (level l,
interval r) pair, worth q[i, l] x q_r(r) / 100 (``quality.IntervalQuality``), and with sizes
buckets are split by size too. Every call of an iteration (the full call and the cached call
of each size present, ``steptime.StepProfile.mix_s``) takes at least a_f (a_c for a cached
call) GPU-seconds per unit of load, the least over every load of its curve; a member of size
weight w at interval r puts w / r of load on the full call and w (r - 1) / r on the cached
call per step, so its N - K steps cost at least (N - K) w (a_f / r + a_c (r - 1) / r), plus its
join and leave (``relaxed_step_cost``; it needs the run to fit its window alone). That cost
and the interval's quality are both linear in the share of steps run at each interval, so a
member whose interval a boundary raised is a mix of columns the LP already allows. A pinned
batch is one size at r = 1, at that size's batch latency. The first request is answered no
sooner than alone at the fastest level and interval of the smallest size
(``earliest_answer_s``). This form drops each step's time (beyond fitting alone), so without
intervals and sizes the tighter ``step_cost`` is used and the bound is unchanged.

W_b is the longest window in bucket b (no shorter than each member's). The violation bound
maximises sum y instead. Slack left by the relaxation: batches are perfectly full (cost at the
best batch size; a step-level member at the best mix of counts), work is divisible across GPUs
and slots, and a request's window is widened to whole slots (at most ``window_s`` at each
end). The default 1 s slot is 5% of the 21 s reference SLO. A member's steps are not limited
per slot (only over its window): the tighter per-slot form (steps in each slot at most its
seconds there over s(n)) was measured from outside at +0.06 points at Poisson 80 and +0.58 at
100 and needs a column per bucket, slot and count; it is not built (``docs/comparison.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from promptserve.policy.joint import group_gpus
from promptserve.profile import Profile

DEFAULT_WINDOW_S = 1.0


def per_image_cost(profile: Profile, k: int, window_s: float) -> float:
    """Fewest GPU-seconds an image at level K can take inside ``window_s``: as a member of a
    batch that fits (``batch_cost``) or of step-level iterations (``step_cost``), whichever
    is less (inf if neither fits)."""
    return min(batch_cost(profile, k, window_s), step_cost(profile, k, window_s))


def batch_cost(profile: Profile, k: int, window_s: float, shape: int = 0) -> float:
    """Fewest GPU-seconds per image at level K in a batch of one size that fits ``window_s``
    (inf if none)."""
    costs = [
        profile.sized_latency(k, b, shape) / b
        for b in range(1, profile.max_batch + 1)
        if profile.sized_latency(k, b, shape) <= window_s
    ]
    return min(costs) if costs else math.inf


def step_cost(profile: Profile, k: int, window_s: float) -> float:
    """Fewest GPU-seconds per image at level K as a step-level member in flight for at most
    ``window_s`` (inf if its steps cannot fit): its N - K steps, each in an iteration of some
    n members (``s(n)`` seconds of its time, ``s(n) / n`` of the GPU's), plus its join and
    leave (GPU time, its time too). The least over every mix of counts is a two-row LP
    (steps; time) whose optimum uses at most two counts: the best of the single counts that
    fit and of the pairs that straddle the time per step allowed."""
    from promptserve.steptime import step_profile

    sp = step_profile(profile)
    steps = profile.total_steps - k
    fixed = sp.join_s + sp.leave_s
    budget = window_s - fixed
    if steps <= 0:
        return fixed if budget >= -1e-9 else math.inf
    if budget <= 0:
        return math.inf
    per_step = budget / steps  # the member's seconds per step, at most
    m = np.array(sp.step_s)  # its seconds per step at n members
    a = m / np.arange(1, len(m) + 1)  # the GPU's seconds per member-step
    lo = m <= per_step + 1e-12  # the counts whose steps fit the time alone
    hi = ~lo
    best = float(a[lo].min()) if lo.any() else math.inf
    if lo.any() and hi.any():  # share x of the steps at a slow-count j, the rest at i
        mi, ai = m[lo][:, None], a[lo][:, None]
        mj, aj = m[hi][None, :], a[hi][None, :]
        x = (per_step - mi) / (mj - mi)  # the share at j that uses the time exactly
        best = min(best, float((ai + x * (aj - ai)).min()))
    return steps * best + fixed


def relaxed_step_cost(profile: Profile, k: int, r: int, window_s: float, shape: int = 0) -> float:
    """Fewest GPU-seconds an image at level K, feature-cache interval ``r`` and size ``shape``
    can take as a step-level member inside ``window_s`` (inf if it cannot finish even alone):
    every one of its N - K steps at the least GPU time per unit of load any call has (one full
    step in r, the rest cached), plus its join and leave. It drops the time a member's steps
    take (beyond fitting alone), so it holds for any mix of counts, sizes and intervals
    (``step_cost`` is the tighter form for one size without feature caching)."""
    from promptserve.steptime import step_profile

    sp = step_profile(profile)
    w = sp.shape_weights[shape]
    steps, fixed = profile.total_steps - k, sp.join_s + sp.leave_s
    cached = (r - 1) / r
    if steps * _alone_step_s(sp, w, r) + fixed > window_s + 1e-9:
        return math.inf
    full_a = _least_per_load(sp.call_s, sp.max_inflight)
    cached_a = _least_per_load(sp.cached_call_s, sp.max_inflight) if r > 1 else 0.0
    return steps * w * (full_a / r + cached * cached_a) + fixed


def _alone_step_s(sp, w: float, r: int) -> float:  # noqa: ANN001 - a StepProfile
    """A member's mean step alone, of size weight ``w`` at interval ``r``: one full call in r,
    the rest cached (the fastest a member's steps can go)."""
    return sp.call_s(w) / r + (r - 1) / r * sp.cached_call_s(w)


def _least_per_load(call_s, counts: int) -> float:  # noqa: ANN001 - a call's seconds at a load
    """The least seconds per unit of load of a step curve, over every load from 1 up: at a
    measured count, or the last segment's slope (the limit past the curve's end)."""
    ratios = [call_s(float(n)) / n for n in range(1, counts + 1)]
    if counts >= 2:
        slope = call_s(float(counts)) - call_s(float(counts - 1))
        ratios.append(max(slope, 0.0))
    return min(ratios)


def earliest_answer_s(profiles: Sequence[Profile]) -> float:
    """The soonest any request can be answered after it arrives: alone, at the fastest level,
    on the fastest GPU, as a batch or as a step-level member (at any interval and size)."""
    from promptserve.steptime import finishes, step_profile

    out = math.inf
    for p in profiles:
        fastest = p.levels[-1]
        sp = step_profile(p)
        step = finishes(sp, 0.0, [p.total_steps - fastest], joined=1)[0]
        out = min(out, p.batch_latency(fastest, 1), step)
        if p.feature_r_max > 1 or len(p.shape_weights) > 1:
            w = min(p.shape_weights)
            steps, fixed = p.total_steps - fastest, sp.join_s + sp.leave_s
            for r in range(1, p.feature_r_max + 1):
                out = min(out, steps * _alone_step_s(sp, w, r) + fixed)
    return out


def oracle_bounds(
    arrival_s: np.ndarray,
    deadline_s: np.ndarray,
    k_opt: np.ndarray,
    profiles: Sequence[Profile],
    quality: np.ndarray,
    window_s: float = DEFAULT_WINDOW_S,
    no_neighbour: np.ndarray | None = None,
    interval_q: Sequence[float] = (),
    shapes: np.ndarray | None = None,
) -> dict[str, float]:
    """Upper bound on effective quality (percent) and lower bound on the SLO-violation ratio.
    ``no_neighbour``: the requests that cannot have a cached neighbour (level 0 only);
    ``interval_q``: quality kept at each feature-cache interval (``Setting.interval_q``; the
    profiles' ``feature_r_max`` intervals are offered); ``shapes``: each request's size."""
    n = len(arrival_s)
    if n == 0:
        return _result(0.0, 0.0, window_s)
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    levels = profiles[0].levels
    groups = group_gpus(profiles)
    r_max = max(p.feature_r_max for p in profiles) if len(interval_q) > 1 else 1
    shapes = np.zeros(n, dtype=int) if shapes is None else np.asarray(shapes, dtype=int)
    relaxed = r_max > 1 or bool(shapes.any())
    budget = (deadline_s - arrival_s).astype(float)
    t0 = float(arrival_s.min())
    first = ((arrival_s - t0) // window_s).astype(int)
    # the slots a request's window overlaps for a positive time (a deadline on a slot's edge
    # does not reach into it)
    last = np.maximum(np.ceil((deadline_s - t0) / window_s - 1e-9).astype(int) - 1, first)
    cls = np.searchsorted(levels, k_opt)
    if no_neighbour is not None:  # a class of its own past the K_opt classes: level 0 only
        cls = np.where(no_neighbour, len(levels), cls)
        quality = np.vstack([quality, quality[0]])
    # a column per (level, interval): the level's quality times what the interval keeps
    kept = np.array([1.0, *[q / 100.0 for q in interval_q[1:r_max]]])
    quality = (quality[:, :, None] * kept[None, None, :]).reshape(len(quality), -1)
    columns = [(k, r) for k in levels for r in range(1, r_max + 1)]
    keys, bucket, counts = np.unique(
        np.stack([first, last, cls, shapes], axis=1),
        axis=0,
        return_inverse=True,
        return_counts=True,
    )
    spans, bucket_span = np.unique(keys[:, :2], axis=0, return_inverse=True)
    bucket_budget = np.zeros(len(keys))
    np.maximum.at(bucket_budget, bucket.ravel(), budget)

    def cost(p: Profile, k: int, r: int, w: float, shape: int) -> float:
        if not relaxed:
            return per_image_cost(p, k, w)
        if r > p.feature_r_max:  # a GPU type that offers fewer intervals
            return math.inf
        batch = batch_cost(p, k, w, shape) if r == 1 else math.inf
        return min(batch, relaxed_step_cost(p, k, r, w, shape))

    # a bucket's requests are costed at its longest window: no less than each one's own
    pairs, pair_of = np.unique(
        np.stack([bucket_budget, keys[:, 3]], axis=1), axis=0, return_inverse=True
    )
    table = np.array(
        [[[cost(p, k, r, w, int(s)) for k, r in columns] for p, _ in groups] for w, s in pairs]
    )[pair_of.ravel()]  # [bucket, group, column]
    lp = _Lp(keys, counts, spans, bucket_span.ravel(), groups, table, r_max, len(levels))
    lp.build(window_s)
    q = quality[keys[lp.y_bucket, 2], lp.y_level]
    best_q = lp.solve(q)
    best_n = lp.solve(np.ones(len(q)))
    return _result(best_q / n, max(1.0 - best_n / n, 0.0), window_s)


def _result(quality: float, violation: float, window_s: float) -> dict[str, float]:
    return {
        "effective_quality_upper_bound": round(quality, 3),
        "slo_violation_ratio_lower_bound": round(violation, 4),
        "window_s": window_s,
    }


class _Lp:
    """The sparse LP of the module docstring; y columns first, then z columns."""

    def __init__(self, keys, counts, spans, bucket_span, groups, cost, r_max=1, levels=0):
        self.keys, self.counts, self.spans = keys, counts, spans
        self.bucket_span = bucket_span
        self.groups, self.cost = groups, cost  # cost: [bucket, group, column], inf: cannot fit
        self.r_max = r_max  # columns per level (feature-cache intervals)
        self.levels = levels or cost.shape[2] // r_max

    def build(self, window_s: float) -> None:
        _, n_groups, m = self.cost.shape
        ys = [
            (b, lv, p)
            for b in range(len(self.keys))
            for p in range(n_groups)
            for lv in range(m)
            if np.isfinite(self.cost[b, p, lv])
            # past the K_opt classes: no neighbour, level 0 only (at any interval)
            and (lv < self.r_max or self.keys[b, 2] < self.levels)
        ]
        yb = np.array([y[0] for y in ys], dtype=int)
        yl = np.array([y[1] for y in ys], dtype=int)
        yp = np.array([y[2] for y in ys], dtype=int)
        self.y_bucket, self.y_level, self.n_y = yb, yl, len(ys)
        span_len = self.spans[:, 1] - self.spans[:, 0] + 1
        zw = np.repeat(np.arange(len(self.spans)), span_len)
        zt = np.concatenate([np.arange(s, e + 1) for s, e in self.spans])
        zw = np.tile(zw, n_groups)
        zt = np.tile(zt, n_groups)
        zp = np.repeat(np.arange(n_groups), int(span_len.sum()))
        n_z = len(zw)
        slots = int(self.spans[:, 1].max()) + 1
        n_b, n_w = len(self.keys), len(self.spans)
        # rows: demand (per bucket), link (per window x group), capacity (per slot x group)
        y_cols = np.arange(self.n_y)
        z_cols = self.n_y + np.arange(n_z)
        rows = np.concatenate(
            [yb, n_b + self.bucket_span[yb] * n_groups + yp, n_b + zw * n_groups + zp]
        )
        rows = np.concatenate([rows, n_b + n_w * n_groups + zt * n_groups + zp])
        cols = np.concatenate([y_cols, y_cols, z_cols, z_cols])
        vals = np.concatenate(
            [np.ones(self.n_y), self.cost[yb, yp, yl], -np.ones(n_z), np.ones(n_z)]
        )
        shape = (n_b + n_w * n_groups + slots * n_groups, self.n_y + n_z)
        self.a = coo_matrix((vals, (rows, cols)), shape=shape).tocsr()
        size = np.array([len(members) for _, members in self.groups], dtype=float)
        self.b = np.concatenate(
            [self.counts, np.zeros(n_w * n_groups), np.tile(size * window_s, slots)]
        )
        self.n_z = n_z

    def solve(self, y_objective: np.ndarray) -> float:
        c = np.concatenate([-y_objective, np.zeros(self.n_z)])
        res = linprog(c, A_ub=self.a, b_ub=self.b, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"oracle LP failed: {res.message}")
        return float(-res.fun)
