"""Per-decision cost of step-level serving at arrival and join, against the GPU count.

Builds a ``StepScheduler`` over 8 to 4,096 GPUs, each already running 8 members at random
steps, then times ``arrive`` (admission, placement, the K choice and the deadline check on the
chosen GPU) for fresh requests. Prints one JSON line: microseconds per decision (median and
p99) per GPU count. The target: at most 50 us, flat in the GPU count.
"""

from __future__ import annotations

import json
import time

import numpy as np

from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Demand, Job
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.steptime import step_profile

GPU_COUNTS = (8, 64, 512, 4096)
DECISIONS = 2000
MIX = (0.225, 0.426, 0.213, 0.046, 0.032, 0.058)


def measure(gpus: int, rng: np.random.Generator) -> dict:
    profile = reference_profile()
    qm = quality_model(profile.levels, profile.quality, "steep")
    sched = StepScheduler(
        step_profile(profile), gpus, qm.matrix(), StepConfig("price", shed=True, admission=True)
    )
    sched.reprice(Demand(28.0 * gpus, MIX), 21.0)  # loaded: the price is above zero
    levels = profile.levels
    next_id = 0
    for gpu in sched.gpus:
        for _ in range(8):
            job = Job(next_id, 0.0, 21.0 + rng.random() * 10, 0, 25, 0)
            sched.life.admit_member(gpu, job, int(rng.choice(levels)), [])
            next_id += 1
        before = 0
        sched.cluster.recount(gpu, before)
        gpu.done = int(rng.integers(0, 20))
        gpu.seg_start, gpu.seg_iter_s = 0.0, sched.profile.iteration_s(8)
    times = []
    for i in range(DECISIONS):
        k_opt = int(rng.choice(levels, p=np.asarray(MIX) / sum(MIX)))
        job = Job(next_id + i, 1.0, 22.0, k_opt, 25, k_opt)
        t0 = time.perf_counter()
        gpu, _ = sched.placement.arrive(1.0, job)
        times.append(time.perf_counter() - t0)
        if gpu is not None:  # undo, so every decision sees the same load
            sched.remove(job.id)
        else:
            sched.queue.clear()
    us = np.asarray(times) * 1e6
    return {
        "gpus": gpus,
        "median_us": round(float(np.median(us)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    rows = [measure(g, rng) for g in GPU_COUNTS]
    print(
        json.dumps(
            {
                "bench": "step_decision",
                "rows": rows,
                "target_us": 50,
                "meets_target": all(r["median_us"] <= 50 for r in rows),
                "growth_4096_over_8": round(rows[-1]["median_us"] / rows[0]["median_us"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
