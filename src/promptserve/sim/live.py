"""The simulator's prediction for a live server's workload (``bench --compare-sim``): the same
requests through the same policy, GPUs, profile (the server's, scaled by its ``--speedup``: the
modelled backend runs that many times faster than the profile its planner reads), deadline,
embedder and thresholds, from an empty cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from promptserve.policy import Status, get_policy
from promptserve.profile import Profile
from promptserve.sim.records import Records
from promptserve.types import Request


def profile_from(d: dict) -> Profile:
    """A profile from ``GET /v1/server``'s JSON (lists back to tuples)."""

    def tup(v):  # noqa: ANN001, ANN202
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return Profile(**{k: tup(v) for k, v in d.items()})


def cache_mix(recs: Records) -> dict:
    """The share of answers that started from a cached latent, and the K mix of the answers."""
    served = recs.status == Status.SERVED
    n = int(served.sum())
    levels, counts = np.unique(recs.level[served], return_counts=True)
    return {
        "hit_ratio": round(float(recs.hit()[served].sum() / n), 4) if n else 0.0,
        "k_mix": {str(int(k)): int(c) for k, c in zip(levels, counts, strict=True)},
    }


def simulate_like(
    server: dict, requests: Sequence[Request], slo_s: float, seed: int, phases: int = 0
) -> tuple[dict, dict, dict]:
    """(the simulated row with its cache mix, the oracle, the per-minute timeline). With
    ``phases`` > 0 the row also carries ``over_replan_phases``: the figures with the re-plan
    grid moved to each of ``phases`` offsets across one period (``replan_phase_spread``)."""
    from promptserve.cache.embed import make_embedder
    from promptserve.cache.thresholds import embedder_thresholds
    from promptserve.sim.compare import CompareConfig, compare, sim_inputs
    from promptserve.sim.simulator import simulate

    profile = profile_from(server["profile"]).scaled(float(server.get("speedup", 1.0)))
    embeddings = make_embedder(server["embedder"]).embed([r.prompt for r in requests])
    thresholds = embedder_thresholds(server["embedder"])
    config = CompareConfig(int(server["workers"]), slo_s, "mild", seed)
    policy = get_policy(server["policy"])
    inputs = sim_inputs(requests, embeddings, profile, thresholds, config)
    rows, oracle, timelines, results = compare([policy], inputs, config)
    row = rows[policy.name] | cache_mix(results[0].records)
    if phases > 0 and policy.replan_s:  # phase 0 is the run above; the bound does not move
        runs = [rows[policy.name]]
        for i in range(1, phases):
            moved = replace(inputs, replan_phase_s=i * policy.replan_s / phases)
            runs.append(simulate(policy, moved).records.summary([]))
        row["over_replan_phases"] = replan_phase_spread(runs)
    return row, oracle, timelines[policy.name]


def replan_phase_spread(rows: Sequence[dict]) -> dict:
    """Min, mean and max of effective quality and violation ratio over runs that differ only in
    the re-plan grid's phase: how far the simulator's own prediction moves with timing a live
    server cannot hold to the millisecond (its loops, batch overheads of 10-100 ms)."""
    out: dict = {"phases": len(rows)}
    for key in ("effective_quality", "slo_violation_ratio"):
        values = [float(r[key]) for r in rows]
        out[key] = {
            "min": min(values),
            "mean": round(sum(values) / len(values), 4),
            "max": max(values),
        }
    return out


def within_spread(live: dict, spread: dict) -> bool:
    """Whether a live run's effective quality and violation ratio both lie in the simulator's
    spread over re-plan phases."""
    return all(
        spread[key]["min"] - 1e-9 <= float(live[key]) <= spread[key]["max"] + 1e-9
        for key in ("effective_quality", "slo_violation_ratio")
    )
