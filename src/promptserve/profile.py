"""Latency and throughput per approximation level and batch size.

A level is identified by K, the number of the model's denoising steps it skips by starting
from a cached latent (K = 0 is full generation). Planner, dispatcher and simulator all ask
one question of a profile: ``batch_latency(k, batch)`` in seconds.

Two sources:

* the published SDXL reference (``data/reference_profile_sdxl.json``): unbatched
  throughput per level and a 1.65x factor for batched execution. We turn them into an
  affine batch curve, ``latency(K, b) = latency(K, 1) * (1 + c * (b - 1))``: a batch costs a
  share that does not grow with the batch (weights read once per step) plus a share per
  image. ``c`` is set so that batch 8 gives the stated 1.65x throughput (c = 0.55); the
  curve then gives 1.29x at 2, 1.51x at 4, 1.73x at 16 and at most 1/c = 1.82x. The
  reference does not say at which batch size 1.65x holds; 8 is the middle of the sizes
  DiffServe plans over (1 to 32) and where SDXL at 1024 px is compute-bound on one GPU.
* a measured profile (format ``promptserve-profile/1``, written by ``promptserve profile``):
  latency per level and batch size, interpolated linearly between measured sizes.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from promptserve.cachedstep import REFERENCE_CACHED_STEP_SHARE
from promptserve.errors import InputError
from promptserve.paths import data_file

PROFILE_FORMAT = "promptserve-profile/1"
REFERENCE_BATCH_FOR_FACTOR = 8
REFERENCE_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Profile:
    """One device type running one model."""

    name: str
    total_steps: int
    levels: tuple[int, ...]  # K values, ascending, levels[0] == 0
    quality: tuple[float, ...]  # relative quality (percent of K = 0) per level
    batch_sizes: tuple[int, ...]  # ascending, starts at 1
    latency_s: tuple[tuple[float, ...], ...]  # [level index][batch-size index], seconds
    model_load_s: float = 0.0  # seconds to load the model onto a device
    # measured for step-level serving (``promptserve profile``); empty: derived from the batch
    # latencies (``steptime.step_profile``)
    step_inflight: tuple[int, ...] = ()  # in-flight counts measured, ascending from 1
    step_latency_s: tuple[float, ...] = ()  # seconds of one denoiser step at each count
    encode_s: float = 0.0  # per request, at join: its text encoding
    decode_s: float = 0.0  # per request, at leave: its VAE decode and PNG
    # per size served (``for_sizes``): its pixels against the size the profile was measured at
    shape_weights: tuple[float, ...] = (1.0,)
    # LoRA residency (``for_adapters``): adapters a device holds at once (0: every one), and
    # the seconds one takes to load into a free row
    adapter_slots: int = 0
    adapter_load_s: float = 0.0
    adapter_private: bool = False  # every join loads its adapters (--lora-private)
    # the most pixels in flight on one GPU, in images of the profile's size (0: no bound;
    # ``serve --max-inflight-megapixels``)
    max_inflight_weight: float = 0.0
    # feature caching: a cached step's time over a full one's (0: the engine has none), and
    # the longest interval a request may be served at (1: none)
    cached_step_share: float = 0.0
    feature_r_max: int = 1
    # a cached step at each ``step_inflight`` count (``promptserve profile``; empty: the share
    # of a full step, at every count)
    cached_step_latency_s: tuple[float, ...] = ()

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def level_index(self, k: int) -> int:
        try:
            return self.levels.index(k)
        except ValueError:
            raise InputError(f"level K={k} is not in profile {self.name!r} {self.levels}") from None

    def batch_latency(self, k: int, batch: int) -> float:
        """Seconds to run one batch of ``batch`` images at level K."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} outside 1..{self.max_batch}")
        row = self.latency_s[self.level_index(k)]
        j = bisect.bisect_left(self.batch_sizes, batch)
        if self.batch_sizes[j] == batch:
            return row[j]
        b0, b1 = self.batch_sizes[j - 1], self.batch_sizes[j]
        return row[j - 1] + (row[j] - row[j - 1]) * (batch - b0) / (b1 - b0)

    def sized_latency(self, k: int, batch: int, shape: int = 0) -> float:
        """Seconds of one batch of ``batch`` images of one size: as ``batch x weight`` native
        images (``steptime`` has the scaling and why), linear past the curve's ends."""
        if shape == 0:
            return self.batch_latency(k, batch)
        load = batch * self.shape_weights[shape]
        sizes = self.batch_sizes
        if len(sizes) == 1:
            return self.batch_latency(k, sizes[0]) * max(load, 1.0)
        if sizes[0] <= load <= sizes[-1] and load == int(load):
            return self.batch_latency(k, int(load))
        lo = bisect.bisect_right(sizes, load) - 1
        j = min(max(lo, 0), len(sizes) - 2)
        b0, b1 = sizes[j], sizes[j + 1]
        l0, l1 = self.batch_latency(k, b0), self.batch_latency(k, b1)
        return max(l0 + (l1 - l0) * (load - b0) / (b1 - b0), 0.1 * self.batch_latency(k, 1))

    def interval_cost(self, r: int) -> float:
        """A member's mean step at feature-cache interval ``r`` over a full step: one full
        step and ``r - 1`` cached ones every ``r`` (1 without a feature cache)."""
        if r < 1:
            raise ValueError(f"a feature-cache interval is >= 1, got {r}")
        if r == 1 or not self.cached_step_share:
            return 1.0
        return (1.0 + (r - 1) * self.cached_step_share) / r

    def throughput_qpm(self, k: int, batch: int = 1) -> float:
        """Images per minute of one device running full batches of ``batch`` at level K."""
        return 60.0 * batch / self.batch_latency(k, batch)

    def level_quality(self, k: int) -> float:
        return self.quality[self.level_index(k)]

    def scaled(self, speedup: float) -> Profile:
        """The same device ``speedup`` times faster (what the modelled backend's ``--speedup``
        runs): every time divided."""
        if speedup == 1.0:
            return self
        return replace(
            self,
            name=f"{self.name}/x{speedup:g}",
            latency_s=tuple(tuple(t / speedup for t in row) for row in self.latency_s),
            model_load_s=self.model_load_s / speedup,
            step_latency_s=tuple(t / speedup for t in self.step_latency_s),
            cached_step_latency_s=tuple(t / speedup for t in self.cached_step_latency_s),
            encode_s=self.encode_s / speedup,
            decode_s=self.decode_s / speedup,
        )


def for_sizes(profile: Profile, sizes: Sequence[tuple[int, int]]) -> Profile:
    """``profile`` (measured at ``sizes[0]``, the model's own) serving ``sizes``: size i's
    weight is its pixel count over the first's."""
    if len(sizes) <= 1:
        return replace(profile, shape_weights=(1.0,))
    native = sizes[0][0] * sizes[0][1]
    return replace(profile, shape_weights=tuple(w * h / native for w, h in sizes))


def for_adapters(profile: Profile, slots: int, load_s: float, private: bool = False) -> Profile:
    """``profile`` on devices that hold ``slots`` LoRA adapters at once, ``load_s`` a load;
    ``private``: each held only while a running member names it."""
    return replace(profile, adapter_slots=slots, adapter_load_s=load_s, adapter_private=private)


FEATURE_R_MAX = 4  # the longest interval offered by default (DeepCache's examples use 3-5)


def with_feature_cache(
    profile: Profile, share: float = REFERENCE_CACHED_STEP_SHARE, r_max: int = FEATURE_R_MAX
) -> Profile:
    """``profile`` whose engine runs a cached step in ``share`` of a full one's time, serving
    intervals 1 to ``r_max``."""
    if not 0 < share < 1:
        raise InputError(f"a cached step's share of a full step must be in (0, 1), got {share}")
    if not 1 <= r_max < 64:
        raise InputError(f"--r-max must be in 1..63, got {r_max}")
    return replace(profile, cached_step_share=share, feature_r_max=r_max)


def reference_profile(path: str | Path | None = None) -> Profile:
    """The published SDXL figures as a profile (see the module docstring for the curve)."""
    path = Path(path) if path else data_file("reference_profile_sdxl.json")
    raw = _read_json(path)
    try:
        ref = _ReferenceFile.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_first_error(path, exc)) from None
    return _from_reference(ref, path.stem)


def load_profile(path: str | Path) -> Profile:
    """A measured profile file, or the published reference format."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, dict) and "throughput_per_gpu_qpm_unbatched" in raw:
        return reference_profile(path)
    try:
        measured = MeasuredProfile.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_first_error(path, exc)) from None
    return measured.to_profile()


def profile_for(path: str | Path, name: str, total_steps: int, levels: Sequence[int]) -> Profile:
    """A profile file to plan a served model with (``serve --profile``), checked against what
    the model runs: measured for other steps or levels, its latencies mean nothing here."""
    profile = load_profile(path)
    if profile.total_steps != total_steps or tuple(profile.levels) != tuple(levels):
        raise InputError(
            f"--profile {path}: measured for {profile.total_steps} steps at levels "
            f"{list(profile.levels)}, but {name} runs {total_steps} steps at levels "
            f"{list(levels)} (measure it with promptserve profile --model ...)"
        )
    return profile


def batch_coefficient(factor: float, at_batch: int) -> float:
    """``c`` of the affine curve for which batch ``at_batch`` runs ``factor`` x faster per image."""
    return (at_batch / factor - 1.0) / (at_batch - 1)


def _from_reference(ref: _ReferenceFile, name: str) -> Profile:
    c = batch_coefficient(ref.batched_throughput_factor, REFERENCE_BATCH_FOR_FACTOR)
    rows = tuple(
        tuple(60.0 / t * (1.0 + c * (b - 1)) for b in REFERENCE_BATCH_SIZES)
        for t in ref.throughput_per_gpu_qpm_unbatched
    )
    return Profile(
        name=name,
        total_steps=ref.total_steps,
        levels=tuple(ref.skip_levels_K),
        quality=tuple(ref.relative_quality_percent),
        batch_sizes=REFERENCE_BATCH_SIZES,
        latency_s=rows,
        model_load_s=ref.model_load_seconds.get("SDXL (5.14 GB)", 0.0),
    )


class _ReferenceFile(BaseModel):
    total_steps: int = Field(ge=1)
    skip_levels_K: list[int] = Field(min_length=1)
    throughput_per_gpu_qpm_unbatched: list[float] = Field(min_length=1)
    batched_throughput_factor: float = Field(ge=1.0)
    relative_quality_percent: list[float] = Field(min_length=1)
    model_load_seconds: dict[str, float] = {}

    @model_validator(mode="after")
    def _aligned(self) -> _ReferenceFile:
        n = len(self.skip_levels_K)
        if (
            len(self.throughput_per_gpu_qpm_unbatched) != n
            or len(self.relative_quality_percent) != n
        ):
            raise ValueError("per-level lists must have one value per skip_levels_K entry")
        return self


class StepMeasure(BaseModel):
    """Step-level serving's costs: one denoiser step against the members in flight, and the
    fixed costs of one request."""

    model_config = ConfigDict(extra="forbid")

    inflight: list[int] = Field(min_length=1)
    step_latency_s: list[float] = Field(min_length=1)
    encode_s: float = Field(ge=0.0)
    decode_s: float = Field(ge=0.0)
    # feature caching: one step with every member on a cached step, at each count (empty:
    # the engine has no feature cache)
    cached_step_latency_s: list[float] = []

    @model_validator(mode="after")
    def _consistent(self) -> StepMeasure:
        if self.inflight[0] != 1 or any(b <= a for a, b in zip(self.inflight, self.inflight[1:])):
            raise ValueError("inflight must start at 1 and increase")
        for name in ("step_latency_s", "cached_step_latency_s"):
            values = getattr(self, name)
            if name == "cached_step_latency_s" and not values:
                continue
            if len(values) != len(self.inflight):
                raise ValueError(f"{name} must have one value per inflight count")
            if any(not v > 0 for v in values):
                raise ValueError(f"{name} values must be > 0 seconds")
        return self

    @property
    def cached_share(self) -> float:
        """A cached step over a full one with one member in flight (0: not measured)."""
        if not self.cached_step_latency_s:
            return 0.0
        return min(max(self.cached_step_latency_s[0] / self.step_latency_s[0], 0.01), 0.99)


class MeasuredProfile(BaseModel):
    """The measured profile file (``promptserve-profile/1``); ``promptserve profile`` writes it.

    ``batch_latency_s[i][j]`` is the seconds one batch of ``batch_sizes[j]`` images takes at
    level ``levels[i]``. ``quality_percent`` may be left out: the published relative quality
    of each K is used then.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["promptserve-profile/1"]
    model: str = Field(min_length=1)
    device: str = "unknown"
    measured_at: str | None = None
    total_steps: int = Field(ge=1, le=1000)
    levels: list[int] = Field(min_length=1)
    batch_sizes: list[int] = Field(min_length=1)
    batch_latency_s: list[list[float]]
    quality_percent: list[float] | None = None
    model_load_s: float = Field(default=0.0, ge=0.0)
    step: StepMeasure | None = None  # None: step-level costs derived from the batch latencies

    @model_validator(mode="after")
    def _consistent(self) -> MeasuredProfile:
        if self.levels[0] != 0 or any(b <= a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError("levels must start at 0 and increase")
        if self.levels[-1] >= self.total_steps:
            raise ValueError("levels must be below total_steps")
        if self.batch_sizes[0] != 1 or any(
            b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])
        ):
            raise ValueError("batch_sizes must start at 1 and increase")
        if len(self.batch_latency_s) != len(self.levels) or any(
            len(row) != len(self.batch_sizes) for row in self.batch_latency_s
        ):
            raise ValueError("batch_latency_s must be one row per level, one value per batch size")
        if any(not v > 0 for row in self.batch_latency_s for v in row):
            raise ValueError("batch_latency_s values must be > 0 seconds")
        if self.quality_percent is not None and len(self.quality_percent) != len(self.levels):
            raise ValueError("quality_percent must have one value per level")
        return self

    def to_profile(self) -> Profile:
        quality = self.quality_percent
        if quality is None:
            ref = reference_profile()
            missing = [k for k in self.levels if k not in ref.levels]
            if missing:
                raise InputError(f"quality_percent is required for levels {missing}")
            quality = [ref.level_quality(k) for k in self.levels]
        return Profile(
            name=f"{self.model}@{self.device}",
            total_steps=self.total_steps,
            levels=tuple(self.levels),
            quality=tuple(quality),
            batch_sizes=tuple(self.batch_sizes),
            latency_s=tuple(tuple(row) for row in self.batch_latency_s),
            model_load_s=self.model_load_s,
            **(
                {
                    "step_inflight": tuple(self.step.inflight),
                    "step_latency_s": tuple(self.step.step_latency_s),
                    "encode_s": self.step.encode_s,
                    "decode_s": self.step.decode_s,
                    "cached_step_share": self.step.cached_share,
                    "cached_step_latency_s": tuple(self.step.cached_step_latency_s),
                }
                if self.step is not None
                else {}
            ),
        )


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"profile {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"profile {str(path)!r} is not valid JSON ({exc})") from None


def _first_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(file)"
    return f"profile {str(path)!r}: field {where}: {err['msg']}"
