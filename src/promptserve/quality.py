"""The quality model q(s, K): the relative quality (percent of full generation) of a prompt
whose nearest cached neighbour has similarity s, served at level K.

Model (its constants are below, their sources in the docstrings):

* K = 0 (full generation) is 100.
* At a level the prompt tolerates (K <= K_opt, K_opt being the largest K whose similarity
  threshold s meets) the prompt gets the published relative quality of that level, Q[K].
* Above K_opt it pays a penalty: ``min(Q[K] - per_level * d, cap)`` where d is the number of
  levels K lies above K_opt. Two presets, both consistent with the published figures:
  ``mild`` (no cap; ``per_level`` about 0.5 point) and ``steep`` (no slope; every level above
  K_opt is worth ``cap``, about 89.6, under the 90% floor the thresholds were chosen for).
  Each preset's free constant is calibrated, not typed in: over the published K_opt mix,
  serving every prompt at K = 25 must average the published Clipper-HT figure, 89.7%.

q never rises with K (Q falls with K and the penalty grows with d) and never falls with s
(a higher s tolerates more levels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PenaltyShape = Literal["mild", "steep"]

# Published figures (reference_profile_sdxl.json): serving everything at K = 25
# (Clipper-HT) averages 89.7% over the K_opt mix of the Argus retrieval log.
CLIPPER_HT_QUALITY = 89.7
CLIPPER_HT_LEVEL = 25
PUBLISHED_KOPT_MIX: Mapping[int, float] = {
    0: 0.225,
    5: 0.426,
    10: 0.213,
    15: 0.046,
    20: 0.032,
    25: 0.059,
}


@dataclass(frozen=True)
class QualityModel:
    levels: tuple[int, ...]  # K values, ascending, levels[0] == 0
    level_quality: tuple[float, ...]  # Q[K], percent
    per_level: float  # points lost per level served above K_opt
    cap: float  # the most a prompt served above its K_opt can get, percent
    shape: str = "custom"

    def q(self, k_opt: int, k: int) -> float:
        """Quality of a prompt with optimal level ``k_opt`` served at level ``k`` (percent)."""
        i, j = self.levels.index(k_opt), self.levels.index(k)
        if j <= i:
            return self.level_quality[j]
        return min(self.level_quality[j] - self.per_level * (j - i), self.cap)

    def matrix(self) -> np.ndarray:
        """q for every (K_opt index, K index) pair: rows K_opt, columns K served."""
        n = len(self.levels)
        return np.array(
            [[self.q(self.levels[i], self.levels[j]) for j in range(n)] for i in range(n)]
        )

    def mean_at(self, k: int, mix: Mapping[int, float]) -> float:
        """Mean quality when every prompt of a K_opt ``mix`` is served at level ``k``."""
        total = sum(mix.values())
        return sum(w * self.q(ko, k) for ko, w in mix.items()) / total

    def mean_at_kopt(self, mix: Mapping[int, float]) -> float:
        """Mean quality when every prompt is served at its own K_opt."""
        total = sum(mix.values())
        return sum(w * self.q(ko, ko) for ko, w in mix.items()) / total


def calibrate(
    levels: Sequence[int],
    level_quality: Sequence[float],
    shape: PenaltyShape,
    mix: Mapping[int, float] = PUBLISHED_KOPT_MIX,
    target: float = CLIPPER_HT_QUALITY,
    at_level: int = CLIPPER_HT_LEVEL,
) -> QualityModel:
    """Fit the preset's free constant so that serving ``mix`` at ``at_level`` averages ``target``.

    Both presets make that mean linear in the free constant, so the fit is closed-form.
    """
    levels, level_quality = tuple(levels), tuple(level_quality)
    total = sum(mix.values())
    j = levels.index(at_level)
    tolerant = sum(w for ko, w in mix.items() if levels.index(ko) >= j) / total
    if tolerant >= 1.0:
        raise ValueError("every prompt of the mix tolerates the level: nothing to calibrate")
    if shape == "mild":
        shortfall = sum(w * max(j - levels.index(ko), 0) for ko, w in mix.items()) / total
        per_level = (level_quality[j] - target) / shortfall
        return QualityModel(levels, level_quality, per_level, math.inf, "mild")
    if shape == "steep":
        cap = (target - tolerant * level_quality[j]) / (1.0 - tolerant)
        return QualityModel(levels, level_quality, 0.0, cap, "steep")
    raise ValueError(f"quality penalty shape {shape!r} is not 'mild' or 'steep'")


def quality_model(
    profile_levels: Sequence[int], profile_quality: Sequence[float], shape: PenaltyShape = "mild"
) -> QualityModel:
    """The calibrated preset for a profile's levels (the published mix uses the SDXL levels)."""
    return calibrate(profile_levels, profile_quality, shape)


REFERENCE_LEVELS = (0, 5, 10, 15, 20, 25)
REFERENCE_QUALITY = (100.0, 97.046, 95.808, 94.378, 93.235, 91.52)


def model_for_levels(
    levels: Sequence[int], level_quality: Sequence[float], shape: PenaltyShape = "mild"
) -> QualityModel:
    """A model on another engine's levels (the tiny model's 0..10 of 20 steps, say) that keeps
    the penalty constants calibrated on the reference levels."""
    ref = calibrate(REFERENCE_LEVELS, REFERENCE_QUALITY, shape)
    return QualityModel(tuple(levels), tuple(level_quality), ref.per_level, ref.cap, shape)


# Feature caching's second axis (issue 34): a full denoiser step every r steps, cached steps
# between. One preset each, from published fixed-interval figures:
#   mild: DeepCache (Ma et al., CVPR 2024, its README): Stable Diffusion 1.5 2.3x faster with a
#     0.05 decline in CLIP score (of about 30: 0.17%), read at its examples' interval 3
#     (cached share 2/3): 0.25 points per unit of cached share, (r - 1) / r of a run's steps;
#   steep: FORA (Selvaraju et al., 2024, fixed interval N = 3 on PixArt-alpha): ImageReward
#     1.2% lower with 2 of every 3 steps cached, and its loss grows much faster than the cached
#     share past N = 3: each cached step reuses features one step staler than the last, so the
#     loss is taken per cached step in a run, 0.6 points each: 0.6 (r - 1) (1.8 at r = 4).
#     (It was 4.0 per unit share, read off cache-dit's FLOPs ratio for a threshold cache, not a
#     fixed interval.)
INTERVAL_LOSS: Mapping[str, float] = {"mild": 0.25, "steep": 0.0}
INTERVAL_LOSS_PER_RUN: Mapping[str, float] = {"mild": 0.0, "steep": 0.6}


@dataclass(frozen=True)
class IntervalQuality:
    """Quality at a feature-cache interval, and how it combines with a level: the interval's
    loss is a share of whatever quality the level leaves (``q(K_opt, K) x q_r(r) / 100``), a
    stated assumption: the two approximations act on different things (where a run starts,
    how each remaining step is computed), so neither is taken to undo the other's loss."""

    loss_per_share: float  # points lost when every step is cached
    shape: str = "custom"
    loss_per_run_step: float = 0.0  # points lost per cached step between two full ones

    def q_r(self, r: int) -> float:
        if r < 1:
            raise ValueError(f"a feature-cache interval is >= 1, got {r}")
        return 100.0 - self.loss_per_share * (r - 1) / r - self.loss_per_run_step * (r - 1)

    def combined(self, level_quality: float, r: int) -> float:
        return level_quality * self.q_r(r) / 100.0


def kept_by_intervals(
    interval_q: Sequence[float], r: int, earlier: Sequence[tuple[int, int]], run_steps: int
) -> float:
    """The share (0-1) of its level's quality a member keeps that ran its last steps at ``r``
    after ``earlier`` ((interval, steps) it ran at before a boundary raised it): the step-
    weighted mean of each interval's ``q_r`` (the loss is linear in the share of cached steps,
    so a run at two intervals loses what each part's cached steps lose)."""
    if not earlier:
        return interval_q[r - 1] / 100.0 if r > 1 else 1.0
    before = sum(steps for _, steps in earlier)
    last = max(run_steps - before, 0)
    kept = sum(steps * interval_q[ri - 1] for ri, steps in earlier) + last * interval_q[r - 1]
    return kept / (100.0 * max(before + last, 1))


def served_quality(
    model: QualityModel,
    interval_q: Sequence[float],
    total_steps: int,
    k_opt: int,
    level: int,
    interval: int = 1,
    earlier: Sequence[tuple[int, int]] = (),
    start: int | None = None,
) -> float:
    """A served request's quality (percent): its level's against its K_opt, times what its
    feature-cache intervals keep of it. The one count both clocks make. An edit (``start``,
    its own start step) keeps a full run's quality: no cached latent stands in for its steps,
    so only its intervals cost it."""
    q = model.q(k_opt, level) if start is None else model.q(model.levels[0], model.levels[0])
    if interval > 1:
        steps = total_steps - (level if start is None else start)
        q *= kept_by_intervals(interval_q, interval, earlier, steps)
    return q


def interval_quality(shape: PenaltyShape = "mild") -> IntervalQuality:
    if shape not in INTERVAL_LOSS:
        raise ValueError(f"quality penalty shape {shape!r} is not 'mild' or 'steep'")
    return IntervalQuality(INTERVAL_LOSS[shape], shape, INTERVAL_LOSS_PER_RUN[shape])
