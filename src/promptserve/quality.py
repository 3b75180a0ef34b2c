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
