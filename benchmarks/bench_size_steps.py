"""The per-size step cost, measured against the scaling the policy times it by (issue 32).

On the tiny model (this CPU), a step-level run's step time is measured with members of one
size (native 64x64 at 1, 2, 4 and 8 in flight: the curve the profile holds; then 32x32, 96x64
and 64x96 at 1 and 4) and with mixed batches (two and three sizes), each against what
``steptime`` predicts from the native curve (a size counts by its pixels, a call per
size present). Also a mixed batch's step against the sum of its sizes' steps run apart (what
one call per size costs over running the sizes on their own). Medians of interleaved repeats.
Prints one JSON line: per case the measured and predicted milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.sizes import shape_table
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import DenoisingEngine, tiny_engine
from promptserve.steptime import StepProfile

NATIVE = (64, 64)
SIZES = ((64, 64), (32, 32), (96, 64), (64, 96))
CURVE = (1, 2, 4, 8)
CASES = {  # name: sizes of the members
    "32x32 x1": [(32, 32)],
    "32x32 x4": [(32, 32)] * 4,
    "96x64 x1": [(96, 64)],
    "96x64 x4": [(96, 64)] * 4,
    "64x96 x4": [(64, 96)] * 4,
    "64x64 x2 + 96x64 x2": [NATIVE, NATIVE, (96, 64), (96, 64)],
    "64x64 x4 + 32x32 x4": [NATIVE] * 4 + [(32, 32)] * 4,
    "64x64 x2 + 96x64 x2 + 64x96 x2": [NATIVE] * 2 + [(96, 64)] * 2 + [(64, 96)] * 2,
}


def step_ms(engine: DenoisingEngine, sizes: list, steps: int) -> float:
    """Median milliseconds of one step with members of ``sizes`` in flight."""
    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    items = [
        (i, GenerationItem(f"prompt {i}", 0, seed=i, look=Look(size=None if s == NATIVE else s)))
        for i, s in enumerate(sizes)
    ]
    runner.join(items)
    runner.step()  # untimed
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=8, help="timed steps a measurement")
    args = parser.parse_args()
    engine = tiny_engine(total_steps=args.steps + 4, levels=(0,))
    engine.set_sizes(SIZES)
    table = shape_table(NATIVE, SIZES)
    weights = tuple(w * h / (NATIVE[0] * NATIVE[1]) for w, h in table)
    curve: dict[int, list[float]] = {n: [] for n in CURVE}
    cases: dict[str, list[float]] = {name: [] for name in CASES}
    apart: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
        for n in CURVE:
            curve[n].append(step_ms(engine, [NATIVE] * n, args.steps))
        for name, sizes in CASES.items():
            cases[name].append(step_ms(engine, sizes, args.steps))
            groups = [[s for s in sizes if s == size] for size in dict.fromkeys(sizes)]
            apart[name].append(sum(step_ms(engine, g, args.steps) for g in groups))
    measured = [statistics.median(curve[n]) / 1000.0 for n in CURVE]
    steps = []
    for n in range(1, CURVE[-1] + 1):  # the profile's interpolation between counts
        j = next(i for i, c in enumerate(CURVE) if c >= n)
        if CURVE[j] == n:
            steps.append(measured[j])
        else:
            n0, n1 = CURVE[j - 1], CURVE[j]
            steps.append(measured[j - 1] + (measured[j] - measured[j - 1]) * (n - n0) / (n1 - n0))
    sp = StepProfile(args.steps + 4, (0,), tuple(steps), shape_weights=weights)
    out = {}
    for name, sizes in CASES.items():
        counts: dict[int, int] = {}
        for s in sizes:
            counts[table.index(s)] = counts.get(table.index(s), 0) + 1
        predicted = 1000.0 * sp.mix_s(counts)
        got = statistics.median(cases[name])
        alone = statistics.median(apart[name])
        out[name] = {
            "measured_ms": round(got, 2),
            "predicted_ms": round(predicted, 2),
            "measured_over_predicted": round(got / predicted, 3),
            "sizes_apart_ms": round(alone, 2),
            "mixed_over_apart": round(got / alone, 3),
        }
    ratios = [c["measured_over_predicted"] for c in out.values()]
    print(
        json.dumps(
            {
                "bench": "size_steps",
                "native_curve_ms": {n: round(1000 * m, 2) for n, m in zip(CURVE, measured)},
                "cases": out,
                "measured_over_predicted_range": [min(ratios), max(ratios)],
            }
        )
    )


if __name__ == "__main__":
    main()
