"""The planner's SLO-capacity model against what the dispatcher really sustains.

For each level K and n GPUs pinned at it, Poisson arrivals all routed to K go through the
same dispatcher and admission the server runs (promptserve's deadline-aware queue, EDF,
batches sized to the head's deadline). The measured capacity is the highest rate (found by
bisection) at which at least 97% of requests finish in time; the model's is
``capacity.level_capacity_qpm``. Prints one JSON line: both per (K, n), and their ratio.
"""

from __future__ import annotations

import argparse
import heapq
import json

import numpy as np

from promptserve.policy import Dispatcher, Job, admit
from promptserve.policy.capacity import level_capacity_qpm
from promptserve.policy.policies import SHED
from promptserve.profile import load_profile, reference_profile

ON_TIME = 0.97


def on_time_ratio(profile, k: int, gpus: int, rate_qpm: float, slo_s: float, seed: int) -> float:
    """Share of a 30-minute Poisson stream at ``rate_qpm`` served by its deadline."""
    d = Dispatcher.create([profile] * gpus, SHED)
    d.set_levels(0.0, [k] * gpus)
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(60.0 / rate_qpm, int(rate_qpm * 30)))
    events: list = [(t, 1, i, None) for i, t in enumerate(times)]
    heapq.heapify(events)
    good, seq = 0, len(times)
    while events:
        now, kind, _, payload = heapq.heappop(events)
        if kind == 1:
            job = admit(d, Job(seq, now, now + slo_s, k, k, k), now)
            if job is not None:
                d.enqueue(job)
        else:
            good += sum(o.time_s <= o.job.deadline_s + 1e-9 for o in d.on_batch_done(now, payload))
        for batch in d.step(now)[0]:
            seq += 1
            heapq.heappush(events, (batch.until_s, 0, seq, batch))
    return good / len(times)


def measured_capacity(profile, k: int, gpus: int, slo_s: float, seeds=(0, 1)) -> float:
    """Highest rate (queries/minute) with >= 97% on time, by bisection, averaged over seeds."""
    out = []
    for seed in seeds:
        low, high = 0.0, gpus * profile.throughput_qpm(k, profile.max_batch)  # no batch is faster
        for _ in range(10):
            mid = (low + high) / 2
            ok = on_time_ratio(profile, k, gpus, mid, slo_s, seed) >= ON_TIME
            low, high = (mid, high) if ok else (low, mid)
        out.append(low)
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", help="profile JSON (default: the SDXL reference)")
    parser.add_argument("--slo", type=float, nargs="+", default=[21.0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    profile = load_profile(args.profile) if args.profile else reference_profile()
    rows = []
    for slo_s in args.slo:
        for k in profile.levels:
            for n in args.gpus:
                real = measured_capacity(profile, k, n, slo_s)
                model = level_capacity_qpm(profile, k, slo_s, SHED.max_batch, n)
                rows.append(
                    {
                        "slo_s": slo_s,
                        "k": k,
                        "gpus": n,
                        "measured_qpm": round(real, 1),
                        "model_qpm": round(model, 1),
                        "model_over_measured": round(model / real, 3) if real else None,
                    }
                )
    ratios = [r["model_over_measured"] for r in rows if r["model_over_measured"]]
    print(
        json.dumps(
            {
                "bench": "capacity",
                "profile": profile.name,
                "on_time_target": ON_TIME,
                "points": rows,
                "model_over_measured": {
                    "min": min(ratios),
                    "median": float(np.median(ratios)),
                    "max": max(ratios),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
