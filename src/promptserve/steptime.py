"""Step-level serving's time model: what one denoiser step costs at each in-flight count, and
when members finish as others leave on the way. Pure numbers, shared by the scheduler and the
simulator's step GPUs.

Sizes: a member of a size with ``w`` times the native pixel count counts as ``w`` native
members in its denoiser call (``call_s``: the measured curve, linear between the counts and past
the ends), and a batch that holds several sizes runs one call per size (``mix_s``), each paying
the call's fixed part. A documented scaling, not a measurement per size: the UNet's and the
transformers' work per member grows with its latent's positions, and the fixed part (weights
read, launches) is paid once a call.)

Feature caching: a size's members on a full step and those on a cached step run as two calls
(as the engine runs them); a cached call is timed on the curve ``promptserve profile`` measured,
or as the cached step's share of a full call, and each call counts by the chance it runs."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from promptserve.profile import Profile

EPS = 1e-9
KIND = 64  # a member's kind, its size and feature-cache interval: ``shape * KIND + r - 1``


def kind(shape: int, r: int = 1) -> int:
    return shape * KIND + r - 1


@dataclass(frozen=True)
class StepProfile:
    """Per-step latency against in-flight count, and the fixed costs of a request."""

    total_steps: int
    levels: tuple[int, ...]
    step_s: tuple[float, ...]  # [n - 1]: seconds of one denoiser step with n members
    join_s: float = 0.0  # per request joining (text encoding), added to its first step
    leave_s: float = 0.0  # per request leaving (VAE decode), added after its last step
    shape_weights: tuple[float, ...] = (1.0,)  # [shape]: pixels against the native size's
    adapter_slots: int = 0  # LoRA adapters a device holds at once (0: every one)
    adapter_load_s: float = 0.0  # seconds to load one into a free row, before a first step
    cached_step_share: float = 0.0  # feature caching: a cached step over a full one (0: none)
    r_max: int = 1  # the longest feature-cache interval offered (1: none)
    cached_s: tuple[float, ...] = ()  # [n - 1]: a cached step of n members, where measured
    adapter_private: bool = False  # every join loads its adapters (--lora-private)
    max_weight: float = 0.0  # pixels in flight on one GPU, in native-size images (0: no bound)

    @property
    def max_inflight(self) -> int:
        return len(self.step_s)

    def iteration_s(self, n: int) -> float:
        return self.step_s[min(max(n, 1), len(self.step_s)) - 1]

    def steps_per_s(self, n: int) -> float:
        return n / self.iteration_s(n)

    @property
    def sized(self) -> bool:
        """Whether more than one size is served."""
        return len(self.shape_weights) > 1

    @property
    def mixed(self) -> bool:
        """Whether members differ in what a step of theirs costs (sizes, intervals); else
        every member counts as one."""
        return self.sized or self.r_max > 1

    @property
    def intervals(self) -> tuple[int, ...]:
        return tuple(range(1, self.r_max + 1))

    def interval_weight(self, r: int) -> float:
        """A member's mean step at interval ``r`` over a full one: a full step and ``r - 1``
        cached ones every ``r`` (``Profile.interval_cost``)."""
        return 1.0 if r == 1 else (1.0 + (r - 1) * self.cached_step_share) / r

    def call_s(self, load: float) -> float:
        """One denoiser call over ``load`` native members' worth of pixels: the measured step
        time at a whole count inside the curve, linear between counts, and past its ends along
        the nearest segment (never below a tenth of one member's step)."""
        return _on_curve(self.step_s, load)

    def cached_call_s(self, load: float) -> float:
        """One call of members all on a cached step (feature caching): the measured cached
        curve where ``promptserve profile`` took one, else the share of a full call."""
        if self.cached_s:
            return _on_curve(self.cached_s, load)
        return self.cached_step_share * self.call_s(load)

    def mix_s(self, counts: Mapping[int, float]) -> float:
        """One iteration of a batch with ``counts[kind]`` members of each kind (``kind``), as
        the engine runs it: per size present, one call of the members on a full step and one
        of those on a cached step. A member at interval r is on a full step one step in r;
        with members' phases independent, each call is counted by the chance that it runs
        times its cost at the members it then holds (so one member at r costs its mean step,
        ``interval_weight(r)``, and every member at r = 1 is the single call of before)."""
        if len(counts) == 1:
            ((only, n),) = counts.items()
            if only == 0:
                return self.iteration_s(int(n)) if n else 0.0  # a count: whole
        w = self.shape_weights
        by_shape: dict[int, list[float]] = {}  # [load full, load cached, P(no full), P(no cached)]
        for key, n in counts.items():
            if n:
                s, i = divmod(key, KIND)
                r = i + 1
                acc = by_shape.setdefault(s, [0.0, 0.0, 1.0, 1.0])
                acc[0] += n * w[s] / r
                acc[1] += n * w[s] * (r - 1) / r
                acc[2] *= (1.0 - 1.0 / r) ** n
                acc[3] *= (1.0 / r) ** n
        total = 0.0
        for full, cached, none_full, none_cached in by_shape.values():
            if full > 0 and none_full < 1.0:
                total += (1.0 - none_full) * self.call_s(full / (1.0 - none_full))
            if cached > 0 and none_cached < 1.0:
                total += (1.0 - none_cached) * self.cached_call_s(cached / (1.0 - none_cached))
        return total

    def member_s(self, n: int, shape: int = 0, r: int = 1) -> float:
        """An iteration of ``n`` members all of one size and interval (the estimate where a
        batch's own mix is not known: admission behind a queue, the capacity the price is set
        for)."""
        if shape == 0 and r == 1:
            return self.iteration_s(n)
        return self.mix_s({kind(shape, r): n})


def _on_curve(steps: Sequence[float], load: float) -> float:
    """A step curve (``[n - 1]``: seconds at n members) at ``load``: measured at a whole count,
    linear between counts, along the nearest segment past the ends, never below a tenth of
    one member's."""
    i = int(load)
    if i == load and 1 <= i <= len(steps):
        return steps[i - 1]
    if len(steps) == 1:
        return steps[0] * max(load, 1.0)
    j = min(max(i, 1), len(steps) - 1)  # the segment [j, j + 1], 1-based counts
    slope = steps[j] - steps[j - 1]
    return max(steps[j - 1] + slope * (load - j), 0.1 * steps[0])


def step_profile(profile: Profile) -> StepProfile:
    """What ``promptserve profile`` measured (step latency per in-flight count, linear between
    the counts measured; encode at join, decode at leave), or, for a profile of batch latencies
    only, the equivalent derived from them (``derived_step_profile``)."""
    if not profile.step_latency_s:
        return derived_step_profile(profile)
    counts = profile.step_inflight

    def per_count(measured: Sequence[float]) -> tuple[float, ...]:
        steps = []
        for n in range(1, counts[-1] + 1):
            j = bisect.bisect_left(counts, n)
            if counts[j] == n:
                steps.append(measured[j])
            else:
                n0, n1 = counts[j - 1], counts[j]
                slope = (measured[j] - measured[j - 1]) / (n1 - n0)
                steps.append(measured[j - 1] + slope * (n - n0))
        return tuple(steps)

    cached = profile.cached_step_latency_s
    return StepProfile(
        profile.total_steps,
        profile.levels,
        per_count(profile.step_latency_s),
        profile.encode_s,
        profile.decode_s,
        profile.shape_weights,
        profile.adapter_slots,
        profile.adapter_load_s,
        profile.cached_step_share,
        profile.feature_r_max,
        per_count(cached) if len(cached) == len(counts) else (),
        profile.adapter_private,
        profile.max_inflight_weight,
    )


def derived_step_profile(profile: Profile) -> StepProfile:
    """The step-level equivalent of a batch profile: a batch of b at level K runs N - K steps of
    b members, so ``step(b) = (L(0, b) - L(K_max, b)) / K_max`` and what is left of L(0, b)
    after N steps is the batch's fixed cost, shared by its b requests (half at join for the
    text encoders, half at leave for the VAE). For the SDXL reference this gives 84 ms x
    (1 + 0.55 (b - 1)) per step and no fixed cost: its throughputs are 60 / (0.084 (50 - K))
    and its batch curve is affine (``profile.py``)."""
    k_max, n = profile.levels[-1], profile.total_steps
    steps, fixed = [], []
    for b in range(1, profile.max_batch + 1):
        full, fastest = profile.batch_latency(0, b), profile.batch_latency(k_max, b)
        step = (full - fastest) / k_max if k_max > 0 else full / n
        steps.append(step)
        fixed.append(max(full - n * step, 0.0) / b)
    per_request = fixed[0]
    return StepProfile(
        n, profile.levels, tuple(steps), per_request / 2, per_request / 2,
        profile.shape_weights, profile.adapter_slots, profile.adapter_load_s,
        profile.cached_step_share, profile.feature_r_max, adapter_private=profile.adapter_private,
        max_weight=profile.max_inflight_weight,
    )  # fmt: skip


def draw(job_id: int) -> float:
    """A uniform number in [0, 1) fixed by the job id (Knuth's multiplicative hash): the same
    request draws the same on both clocks."""
    return ((job_id * 2654435761) % 2**32) / 2**32


def finishes(
    profile: StepProfile,
    start: float,
    remaining: Sequence[int],
    joined: int = 0,
    shapes: Sequence[int] | None = None,
) -> list[float]:
    """Finish times (answers) of members with ``remaining`` steps (ascending) from ``start``,
    if nobody else joins: each segment runs at the step time of the members still in, and the
    members that finish at one step are decoded together before the next step starts.
    ``shapes``: each member's size (``None``: all native), timed by ``StepProfile.mix_s``."""
    counts: dict[int, int] | None = None
    if shapes is not None:
        counts = {}
        for s in shapes:
            counts[s] = counts.get(s, 0) + 1
    n, t, prev, out = len(remaining), start + joined * profile.join_s, 0, []
    step_s, top, leave_s = profile.step_s, len(profile.step_s), profile.leave_s
    i = 0
    while i < n:
        r, j = remaining[i], i
        while j < n and remaining[j] == r:
            j += 1
        # ``iteration_s(n - i)``, inlined: the walk is the policy's innermost loop
        step = step_s[min(n - i, top) - 1] if counts is None else profile.mix_s(counts)
        t += (r - prev) * step + (j - i) * leave_s
        out.extend([t] * (j - i))
        if counts is not None:
            for s in shapes[i:j]:  # type: ignore[index]
                counts[s] -= 1
        prev, i = r, j
    return out
