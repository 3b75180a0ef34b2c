"""One comparison run: build the workload once, simulate each policy on it, bound it offline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from promptserve.cache.index import CacheIndex
from promptserve.cache.thresholds import Thresholds
from promptserve.policy import Policy, Setting
from promptserve.profile import Profile
from promptserve.quality import PenaltyShape, interval_quality, model_for_levels
from promptserve.sim.oracle import DEFAULT_WINDOW_S, earliest_answer_s, oracle_bounds
from promptserve.sim.simulator import SimInputs, SimResult, simulate
from promptserve.types import Request


@dataclass(frozen=True)
class CompareConfig:
    gpus: int
    slo_s: float
    penalty: PenaltyShape
    seed: int
    warm: int = 0
    oracle_window_s: float = DEFAULT_WINDOW_S  # the bound's time slot (seconds)
    coarse_window_s: float | None = None  # also report the bound at this slot (as "coarse")
    replan_phase_s: float = 0.0  # the re-plan grid's offset from the first arrival


def default_slo(profile: Profile) -> float:
    """5x the full-quality single-image latency (21 s for the SDXL reference)."""
    return round(5.0 * profile.batch_latency(0, 1), 1)


def sim_inputs(
    requests: Sequence[Request],
    embeddings: np.ndarray,
    profile: Profile,
    thresholds: Thresholds,
    config: CompareConfig,
    warm: tuple[list[str], np.ndarray] | None = None,
) -> SimInputs:
    """What every policy of a comparison runs on. One route from the reference thresholds and
    quality constants to any profile's levels, the server's too: K_opt on the profile's own
    levels, penalties calibrated on the reference."""
    qm = model_for_levels(profile.levels, profile.quality, config.penalty)
    interval_q = tuple(
        interval_quality(config.penalty).q_r(r) for r in range(1, profile.feature_r_max + 1)
    )
    setting = Setting(
        tuple(profile for _ in range(config.gpus)), qm.matrix(), config.slo_s, interval_q
    )
    return SimInputs(
        requests,
        embeddings,
        setting,
        qm,
        thresholds.on_levels(profile.levels, profile.total_steps),
        config.seed,
        warm[0] if warm else (),
        warm[1] if warm else None,
        config.replan_phase_s,
    )


def compare(
    policies: Sequence[Policy],
    inputs: SimInputs,
    config: CompareConfig,
    on_progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, dict], dict, dict[str, dict], list[SimResult]]:
    """Every policy on the same inputs (``sim_inputs``), and the oracle's bounds on them."""
    setting, thresholds, requests = inputs.setting, inputs.thresholds, inputs.requests
    embeddings, levels = inputs.embeddings, setting.profiles[0].levels
    warm = (list(inputs.warm_prompts), inputs.warm_embeddings) if inputs.warm_prompts else None
    results, rows, timelines = [], {}, {}
    for policy in policies:
        res = simulate(
            policy, inputs, (lambda n, p=policy.name: on_progress(p, n)) if on_progress else None
        )
        results.append(res)
        rows[policy.name] = res.records.summary(res.planner_ms)
        if res.choices:  # ``+select``: what it served with, and what choosing cost
            chosen = [c.chosen for c in res.choices]
            rows[policy.name]["selector"] = {
                "selections": len(chosen),
                "switches": sum(c.switched for c in res.choices),
                "chosen_share": {
                    n: round(chosen.count(n) / len(chosen), 3) for n in sorted(set(chosen))
                },
                "cpu_s": round(res.selector_cpu_s, 3),
            }
        timeline = res.records.per_minute()
        minutes = len(timeline["offered_qpm"])
        timeline["gpus_per_level"] = gpus_per_minute(res.plans, levels, minutes)
        timelines[policy.name] = timeline
    if any(r.strength is not None for r in requests):
        return rows, NO_BOUND_WITH_EDITS, timelines, results
    if any(r.batch for r in requests):  # background work only takes from the interactive
        # requests' capacity: their bound alone bounds them beside it too
        kept = np.array([not r.batch for r in requests])
        requests, embeddings = [r for r in requests if not r.batch], embeddings[kept]
    k_opt, found = oracle_neighbours(
        requests, embeddings, thresholds, warm, earliest_answer_s(setting.profiles)
    )
    bound_args = (
        np.array([r.arrival_s for r in requests]),
        np.array([r.deadline_s for r in requests]),
        k_opt,
        setting.profiles,
        setting.quality,
    )
    looks = (setting.interval_q, np.array([r.shape for r in requests], dtype=int))
    oracle = oracle_bounds(*bound_args, config.oracle_window_s, ~found, *looks)
    if config.coarse_window_s is not None:
        oracle["coarse"] = oracle_bounds(*bound_args, config.coarse_window_s, ~found, *looks)
    return rows, oracle, timelines, results


# the oracle's LP has a level per request, each a generation's cost and quality: an edit's
# (its own steps, a full run's quality) is neither, so with edits there is no bound to print
NO_BOUND_WITH_EDITS = {
    "effective_quality_upper_bound": None,
    "slo_violation_ratio_lower_bound": None,
    "note": "No oracle line: the offline bound does not model edits (run without --edits for one).",
}


def gpus_per_minute(plans, levels: Sequence[int], minutes: int) -> dict[str, list[int]]:
    """GPUs at each level at the start of each minute, from the plans a run applied."""
    out = {str(k): [0] * minutes for k in levels}
    for m in range(minutes):
        applied = [p for t, p in plans if t <= m * 60.0] or [p for _, p in plans[:1]]
        if not applied:
            continue
        plan = applied[-1]
        for k in levels:
            out[str(k)][m] = plan.gpus_at(k)
    return out


def oracle_neighbours(
    requests: Sequence[Request],
    embeddings: np.ndarray,
    thresholds: Thresholds,
    warm,  # noqa: ANN001 - (prompts, embeddings) cached before the first arrival, or None
    earliest_answer_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """K_opt, and whether a neighbour exists, with every earlier prompt of the tenant cached
    from ``earliest_answer_s`` after its arrival (the soonest any schedule can answer it): the
    most any policy sees, since every policy looks up at arrival and caches at the answer."""
    k_opt = np.zeros(len(requests), dtype=int)
    found = np.zeros(len(requests), dtype=bool)
    index = CacheIndex(dim=embeddings.shape[1])
    if warm is not None and requests:
        for p, v in zip(*warm, strict=True):
            index.insert(requests[0].tenant, p, v, (), 0.0)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    cached = 0
    for i in order:
        at = requests[i].arrival_s
        while cached < len(order):  # answered by now at the soonest (an answer at the
            j = order[cached]  # arrival's instant is cached first, as the simulator does)
            if requests[j].arrival_s + earliest_answer_s > at + 1e-9:
                break
            index.insert(requests[j].tenant, requests[j].prompt, embeddings[j], (), 0.0)
            cached += 1
        match = index.nearest(requests[i].tenant, embeddings[i])
        found[i] = match is not None
        k_opt[i] = thresholds.k_opt(match.similarity if match is not None else None)
    return k_opt, found


def config_dict(config: CompareConfig, **extra: object) -> dict:
    return {
        **asdict(config),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()},
    }
