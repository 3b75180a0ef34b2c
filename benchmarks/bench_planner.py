"""Planner time at 8, 64 and 512 GPUs (promptserve's joint MILP and the Argus allocation).

Demand scales with the GPU count (about 45 queries/minute per GPU, the Argus burst per GPU) and
uses the K_opt mix measured on the DiffusionDB prompts. Prints one JSON line; times in ms.
"""

from __future__ import annotations

import json
import time

import numpy as np

from promptserve.policy import Demand, Setting, get_policy
from promptserve.profile import reference_profile
from promptserve.quality import quality_model

MIX = (0.051, 0.213, 0.237, 0.122, 0.136, 0.241)


def time_plan(name: str, gpus: int, repeats: int) -> dict:
    profile = reference_profile()
    setting = Setting(
        (profile,) * gpus, quality_model(profile.levels, profile.quality).matrix(), 21.0
    )
    policy = get_policy(name)
    times = []
    for i in range(repeats):
        demand = Demand(gpus * (30 + 20 * (i % 5) / 4), MIX)  # a spread of loads
        t0 = time.perf_counter()
        policy.plan(demand, setting)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "p50_ms": round(float(np.median(times)), 2),
        "p99_ms": round(float(np.percentile(times, 99)), 2),
    }


def main() -> None:
    out = {"bench": "planner"}
    for gpus in (8, 64, 512):
        out[f"promptserve_{gpus}_gpus"] = time_plan("promptserve", gpus, 50)
        out[f"argus_{gpus}_gpus"] = time_plan("argus", gpus, 20)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
