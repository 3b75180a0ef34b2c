"""Measure q(s, K) on real neighbour pairs and fit the quality model's constants to it.

For each prompt whose nearest earlier prompt (replayed in file order) is known: generate the
neighbour fully (its latents at every level), generate the prompt fully (the reference), then
resume the prompt from the neighbour's latent at each level K and score it against the
reference. The fit keeps the model's shape (``promptserve.quality``): Q[K] is the mean score of
pairs that tolerate K (K <= K_opt), made non-increasing in K; ``per_level`` is the mean loss per
level of pairs served above their K_opt (at least 0); ``cap`` the mean score of those pairs.
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
) -> list[Sample]:
    """``pairs``: (prompt, neighbour, similarity). Scores the prompt resumed at every level."""
    samples = []
    for i, (prompt, neighbour, sim) in enumerate(pairs):
        base, ref = engine.generate(
            [GenerationItem(neighbour, 0, seed=i), GenerationItem(prompt, 0, seed=i)]
        )
        levels = [k for k in engine.levels if k > 0]
        approx = engine.generate([GenerationItem(prompt, k, base.latents[k]) for k in levels])
        scores = scorer.relative(
            [prompt] * len(levels), [a.png for a in approx], [ref.png] * len(levels)
        )
        k_opt = engine_level(thresholds.k_opt(sim), engine)
        samples.extend(Sample(sim, k_opt, k, float(q)) for k, q in zip(levels, scores, strict=True))
        if on_pair is not None:
            on_pair()
    return samples


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
