"""Measure an engine's batch latency per level on this device and write a measured profile."""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable, Sequence

from promptserve.engine.adapterbank import residency
from promptserve.engine.base import Engine, GenerationItem
from promptserve.profile import (
    MeasuredProfile,
    Profile,
    StepMeasure,
    batch_coefficient,
    reference_profile,
)

STEPS_TIMED = 3  # steps timed per in-flight count, after one untimed


def reference_quality(levels: Sequence[int], total_steps: int) -> list[float]:
    """The published quality of the reference level that skips the same fraction of steps."""
    ref = reference_profile()
    out = []
    for k in levels:
        scaled = k * ref.total_steps / total_steps
        nearest = min(ref.levels, key=lambda r: abs(r - scaled))
        out.append(ref.level_quality(nearest))
    return out


def measure(
    engine: Engine,
    model: str,
    levels: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int = 1,
    on_point: Callable[[int, int, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> MeasuredProfile:
    """Median-free and simple: the mean of ``repeats`` timed batches after one warm-up run."""
    seed_run = engine.generate([GenerationItem("a photograph of a lighthouse", 0, seed=0)])[0]
    rows = []
    for k in levels:
        row = []
        for b in batch_sizes:
            items = [
                GenerationItem(f"prompt {i}", k, seed_run.latents.get(k), seed=i) for i in range(b)
            ]
            times = []
            for _ in range(repeats):
                t0 = clock()
                engine.generate(items)
                times.append(clock() - t0)
            row.append(sum(times) / len(times))
            if on_point is not None:
                on_point(k, b, row[-1])
        rows.append(row)
    return MeasuredProfile(
        format="promptserve-profile/1",
        model=model,
        device=device_name(engine),
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        total_steps=engine.total_steps,
        levels=list(levels),
        batch_sizes=list(batch_sizes),
        batch_latency_s=rows,
        quality_percent=reference_quality(levels, engine.total_steps),
    )


def measure_steps(
    engine: Engine,
    inflight: Sequence[int],
    on_point: Callable[[int, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> StepMeasure | None:
    """Step-level costs on the engine's own components: one step with n members in flight
    (all joined, one step untimed, then the mean of a few), one request's text encoding, and
    one latent's decode to PNG. None for an engine without components (the modelled one)."""
    from promptserve.engine.steprunner import StepRunner

    comps = getattr(engine, "c", None)
    if comps is None:
        return None
    if engine.total_steps < STEPS_TIMED + 2:
        raise ValueError(f"{engine.total_steps} steps are too few to time a step")
    runner = StepRunner(comps, engine.total_steps, engine.levels, getattr(engine, "guidance", 7.5))
    cache = engine.caps.feature_cache
    latencies, cached = [], []

    def timed(n: int, interval: int) -> float:
        """One step of n members after one untimed: at ``interval`` past the steps timed,
        that first step is their full one and every timed step a cached one."""
        for key in list(runner.steps_left()):
            runner.cancel(key)
        runner.join(
            [(i, GenerationItem(f"prompt {i}", 0, seed=i, interval=interval)) for i in range(n)]
        )
        runner.step()
        t0 = clock()
        for _ in range(STEPS_TIMED):
            runner.step()
        return (clock() - t0) / STEPS_TIMED

    for n in inflight:
        latencies.append(timed(n, 1))
        if cache:
            cached.append(timed(n, STEPS_TIMED + 2))
        if on_point is not None:
            on_point(n, latencies[-1])
    runner.kernel.encode(["warm-up"])
    t0 = clock()
    for i in range(STEPS_TIMED):
        runner.kernel.encode([f"a lighthouse at dusk {i}"])
    encode_s = (clock() - t0) / STEPS_TIMED
    latent = comps.noise(0)
    comps.decode(latent)
    t0 = clock()
    for _ in range(STEPS_TIMED):
        comps.decode(latent)
    decode_s = (clock() - t0) / STEPS_TIMED
    return StepMeasure(
        inflight=list(inflight),
        step_latency_s=latencies,
        encode_s=encode_s,
        decode_s=decode_s,
        cached_step_latency_s=cached,
    )


def device_name(engine: Engine) -> str:
    """``cuda:NVIDIA H100 80GB HBM3``, ``cpu:x86_64``: what the timings were taken on."""
    device = str(getattr(getattr(engine, "c", None), "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return f"{device}:{platform.processor() or platform.machine()}"


def quick_profile(engine: Engine, max_batch: int = 8) -> Profile:
    """A profile from one timed full run: latency linear in the steps left, and the reference's
    affine batch curve. Enough for a server to plan with; ``promptserve profile`` measures more."""
    if hasattr(engine, "profile"):
        return engine.profile  # the modelled engine runs by a profile already
    engine.generate([GenerationItem("warm-up", 0, seed=0)])
    t0 = time.perf_counter()
    engine.generate([GenerationItem("a photograph of a lighthouse", 0, seed=1)])
    per_step = (time.perf_counter() - t0) / engine.total_steps
    c = batch_coefficient(1.65, 8)
    sizes = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch)
    levels = tuple(engine.levels)
    slots, load_s, private = residency(engine)
    share = cached_step_share(engine) if engine.caps.feature_cache else 0.0
    return Profile(
        name=f"{engine.name}@quick",
        total_steps=engine.total_steps,
        levels=levels,
        quality=tuple(reference_quality(levels, engine.total_steps)),
        batch_sizes=sizes,
        latency_s=tuple(
            tuple(per_step * (engine.total_steps - k) * (1 + c * (b - 1)) for b in sizes)
            for k in levels
        ),
        adapter_slots=slots,
        adapter_load_s=load_s,
        adapter_private=private,
        cached_step_share=share,
    )


def cached_step_share(engine, pairs: int = 5) -> float:  # noqa: ANN001 - a computing engine
    """A cached step's time over a full one's (feature caching, one member; the median of
    alternating pairs), on the engine's own step kernel: what the policy counts an interval's
    steps as."""
    import torch

    kernel = engine.step_runner().kernel
    rows = kernel.encode(["a photograph of a lighthouse"])
    ratio = cached_ratio(kernel, engine.c.noise(1), torch.full((1,), 1), rows, pairs)
    return min(max(ratio, 0.01), 0.99)


def cached_ratio(kernel, x, steps, rows, pairs: int) -> float:  # noqa: ANN001 - a step kernel
    """The median over ``pairs`` alternating full and cached steps of the cached one's time
    over the full one's (``bench_engine.py`` times its shapes by it too)."""
    import statistics

    import torch

    with torch.no_grad():
        _, _, feature = kernel.advance_features(x, steps, rows, None)
        ratios = []
        for _ in range(pairs):
            t0 = time.perf_counter()
            kernel.advance_features(x, steps, rows, None)
            t1 = time.perf_counter()
            kernel.advance_features(x, steps, rows, feature)
            ratios.append((time.perf_counter() - t1) / max(t1 - t0, 1e-9))
    return statistics.median(ratios)
