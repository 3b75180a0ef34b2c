"""Measure q(s, K) on real neighbour pairs and fit the quality model's constants to it.

For each prompt whose nearest earlier prompt (replayed in file order) is known: generate the
neighbour fully (its latents at every level), generate the prompt fully (the reference), then
resume the prompt from the neighbour's latent at each level K and score it against the
reference. The fit keeps the model's shape (``promptserve.quality``): Q[K] is the mean score of
pairs that tolerate K (K <= K_opt), made non-increasing in K; ``per_level`` is the mean loss per
level of pairs served above their K_opt (at least 0); ``cap`` the mean score of those pairs.

Feature caching (an engine with one, ``r_max`` > 1): the prompt is also generated from noise at
each interval r (the same seed) and scored against the same reference; the fit is the
interval model's one constant (``quality.IntervalQuality``), the points lost per unit of cached
share ``(r - 1) / r``, by least squares through the origin. One more run per pair, at its K_opt
level and the longest interval, checks the stated assumption that the two compose by product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.cache.thresholds import Thresholds
from promptserve.engine.base import Engine, GenerationItem
from promptserve.engine.runner import engine_level
from promptserve.engine.scoring import Scorer


@dataclass(frozen=True)
class Sample:
    similarity: float
    k_opt: int
    k: int
    quality: float  # percent of the reference


@dataclass(frozen=True)
class IntervalSample:
    k: int
    r: int
    quality: float  # percent of the reference
    level_quality: float | None = None  # at K > 0: the same pair's score at K, r = 1


@dataclass(frozen=True)
class IntervalFit:
    loss_per_share: float  # points lost when every step is cached (``IntervalQuality``)
    by_interval: dict[int, float]  # r -> mean measured score at K = 0
    combined_measured: float | None  # mean score at (K_opt, r_max), pairs with K_opt > 0
    combined_predicted: float | None  # the product the model takes for them

    def to_json(self) -> dict:
        def rounded(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "loss_per_share": round(self.loss_per_share, 4),
            "by_interval": {str(r): round(q, 3) for r, q in self.by_interval.items()},
            "combined_measured": rounded(self.combined_measured),
            "combined_predicted": rounded(self.combined_predicted),
        }


@dataclass(frozen=True)
class Fit:
    levels: tuple[int, ...]
    level_quality: tuple[float, ...]
    per_level: float
    cap: float
    pairs: int

    def to_json(self) -> dict:
        return {
            "levels": list(self.levels),
            "level_quality": [round(q, 3) for q in self.level_quality],
            "per_level": round(self.per_level, 4),
            "cap": round(self.cap, 3),
            "pairs": self.pairs,
        }


def measure_pairs(
    engine: Engine,
    scorer: Scorer,
    pairs: Sequence[tuple[str, str, float]],
    thresholds: Thresholds,
    on_pair: Callable[[], None] | None = None,
    r_max: int = 1,
    intervals: list[IntervalSample] | None = None,
) -> list[Sample]:
    """``pairs``: (prompt, neighbour, similarity). Scores the prompt resumed at every level;
    with ``r_max`` > 1, also at each interval, into ``intervals``."""
    samples = []
    for i, (prompt, neighbour, sim) in enumerate(pairs):
        base, ref = engine.generate(
            [GenerationItem(neighbour, 0, seed=i), GenerationItem(prompt, 0, seed=i)]
        )
        levels = [k for k in engine.levels if k > 0]
        k_opt = engine_level(thresholds.k_opt(sim), engine)
        items = [GenerationItem(prompt, k, base.latents[k]) for k in levels]
        if r_max > 1:  # from noise at each interval, and at (K_opt, r_max)
            items += [GenerationItem(prompt, 0, seed=i, interval=r) for r in range(2, r_max + 1)]
            if k_opt > 0:
                items.append(GenerationItem(prompt, k_opt, base.latents[k_opt], interval=r_max))
        approx = engine.generate(items)
        scores = [
            float(q)
            for q in scorer.relative(
                [prompt] * len(items), [a.png for a in approx], [ref.png] * len(items)
            )
        ]
        at_level = dict(zip(levels, scores, strict=False))
        samples.extend(Sample(sim, k_opt, k, at_level[k]) for k in levels)
        if intervals is not None and r_max > 1:
            rest = scores[len(levels) :]
            intervals.extend(
                IntervalSample(0, r, q) for r, q in zip(range(2, r_max + 1), rest, strict=False)
            )
            if k_opt > 0:
                intervals.append(IntervalSample(k_opt, r_max, rest[-1], at_level[k_opt]))
        if on_pair is not None:
            on_pair()
    return samples


def fit_intervals(samples: Sequence[IntervalSample]) -> IntervalFit:
    """The interval model's constant from the K = 0 samples, and the composition check."""
    alone = [s for s in samples if s.k == 0]
    shares = np.array([(s.r - 1) / s.r for s in alone])
    losses = np.array([100.0 - s.quality for s in alone])
    loss = max(float(shares @ losses / (shares @ shares)), 0.0) if len(alone) else 0.0
    by_r = {
        r: float(np.mean([s.quality for s in alone if s.r == r]))
        for r in sorted({s.r for s in alone})
    }
    both = [s for s in samples if s.k > 0 and s.level_quality is not None]
    measured = float(np.mean([s.quality for s in both])) if both else None
    predicted = (
        float(np.mean([s.level_quality * (100.0 - loss * (s.r - 1) / s.r) / 100.0 for s in both]))
        if both
        else None
    )
    return IntervalFit(loss, by_r, measured, predicted)


def fit(samples: Sequence[Sample], levels: Sequence[int]) -> Fit:
    levels = tuple(levels)
    q = [100.0]
    for k in levels[1:]:
        ok = [s.quality for s in samples if s.k == k and s.k <= s.k_opt]
        q.append(float(np.mean(ok)) if ok else q[-1])
    q = list(np.minimum.accumulate(q))  # quality never rises with K
    above = [s for s in samples if s.k > s.k_opt]
    losses = [
        (q[levels.index(s.k)] - s.quality) / (levels.index(s.k) - levels.index(s.k_opt))
        for s in above
    ]
    per_level = max(float(np.mean(losses)), 0.0) if losses else 0.0
    cap = float(np.mean([s.quality for s in above])) if above else 100.0
    return Fit(
        levels,
        tuple(q),
        per_level,
        min(cap, 100.0),
        len({(s.similarity, s.k_opt) for s in samples}),
    )
