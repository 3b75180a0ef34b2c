"""A cached step's time over a full one's (feature caching), per model family, as published.

Used where an engine cannot measure its own (the modelled backend, ``simulate``); a served
engine measures its own at start, and ``promptserve profile`` or ``calibrate`` replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptserve.errors import InputError


@dataclass(frozen=True)
class CachedStepShare:
    """A cached step's time over a full one's for one family, and the published figure it is
    read from: a speedup ``speedup`` of a run with one full step every ``interval`` gives
    interval / (1 + (interval - 1) c) = speedup. Used where an engine cannot measure its own
    (the modelled backend, ``simulate``); a served engine measures its own at start, and
    ``promptserve profile`` replaces it."""

    family: str
    speedup: float
    interval: float  # full steps every this many (a threshold cache: its mean)
    source: str

    @property
    def share(self) -> float:
        return (self.interval / self.speedup - 1.0) / (self.interval - 1.0)


CACHED_STEP_SHARES: dict[str, CachedStepShare] = {
    s.family: s
    for s in (
        CachedStepShare(
            "sdxl", 2.6, 3,
            "DeepCache README (horseee/DeepCache): 'Stable Diffusion XL 2.6x', its SDXL example "
            "(cache_interval=3, cache_branch_id=0), end to end, one prompt, batch 1",
        ),
        CachedStepShare(
            "sd1", 2.3, 5,
            "DeepCache (Ma et al., CVPR 2024): Stable Diffusion v1.5 2.3x at its N = 5 setting "
            "(50 PLMS steps), the README's headline",
        ),
        CachedStepShare(
            "flux", 1.84, 50 / 22.7,
            "cache-dit bench/README.md, FLUX.1-dev DrawBench, row F1B0_W4M0MC0_T0O1_R0.08: "
            "23.19 s against 42.63 s (1.84x) and 1729.60 against 3726.87 TFLOPs; with the "
            "first of 57 blocks run on a cached step, the FLOPs give 22.7 full steps of 50",
        ),
        CachedStepShare(
            "sd3", 1.84, 50 / 22.7,
            "no published fixed-interval figure for SD3: FLUX.1's (the same block reuse over "
            "an MMDiT) until `promptserve profile` measures one",
        ),
    )
}  # fmt: skip


def cached_share_of(text: str) -> float:
    """``--cached-step-share``: a family's published share (``sdxl``, ``sd1``, ``sd3``,
    ``flux``) or a number in (0, 1)."""
    if text in CACHED_STEP_SHARES:
        return CACHED_STEP_SHARES[text].share
    try:
        value = float(text)
    except ValueError:
        raise InputError(
            f"--cached-step-share {text!r} is not a number in (0, 1) or one of: "
            + ", ".join(CACHED_STEP_SHARES)
        ) from None
    if not 0 < value < 1:
        raise InputError(f"--cached-step-share must be in (0, 1), got {value}")
    return value


# The reference SDXL profile's cached step (the figures that predate per-family shares).
REFERENCE_CACHED_STEP_SHARE = CACHED_STEP_SHARES["sdxl"].share
