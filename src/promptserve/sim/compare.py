"""One comparison run: build the workload once, simulate each policy on it, bound it offline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from promptserve.cache.index import CacheIndex
from promptserve.cache.replay import replay
from promptserve.cache.thresholds import Thresholds
from promptserve.policy import Policy, Setting
from promptserve.profile import Profile
from promptserve.quality import PenaltyShape, model_for_levels
from promptserve.sim.oracle import DEFAULT_WINDOW_S, oracle_bounds
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


def default_slo(profile: Profile) -> float:
    """5x the full-quality single-image latency (21 s for the SDXL reference)."""
    return round(5.0 * profile.batch_latency(0, 1), 1)


def compare(
    policies: Sequence[Policy],
    requests: Sequence[Request],
    embeddings: np.ndarray,
    profile: Profile,
    thresholds: Thresholds,
    config: CompareConfig,
    warm: tuple[list[str], np.ndarray] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, dict], dict, dict[str, dict], list[SimResult]]:
    # one route from the reference thresholds and quality constants to any profile's levels,
    # the server's too: K_opt on the profile's own levels, penalties calibrated on the reference
    qm = model_for_levels(profile.levels, profile.quality, config.penalty)
    thresholds = thresholds.on_levels(profile.levels, profile.total_steps)
    setting = Setting(tuple(profile for _ in range(config.gpus)), qm.matrix(), config.slo_s)
    inputs = SimInputs(
        requests,
        embeddings,
        setting,
        qm,
        thresholds,
        config.seed,
        warm[0] if warm else (),
        warm[1] if warm else None,
    )
    results, rows, timelines = [], {}, {}
    for policy in policies:
        res = simulate(
            policy, inputs, (lambda n, p=policy.name: on_progress(p, n)) if on_progress else None
        )
        results.append(res)
        rows[policy.name] = res.records.summary(res.planner_ms)
        timeline = res.records.per_minute()
        minutes = len(timeline["offered_qpm"])
        timeline["gpus_per_level"] = gpus_per_minute(res.plans, profile.levels, minutes)
        timelines[policy.name] = timeline
    bound_args = (
        np.array([r.arrival_s for r in requests]),
        np.array([r.deadline_s for r in requests]),
        oracle_k_opt(requests, embeddings, thresholds, warm),
        setting.profiles,
        setting.quality,
    )
    oracle = oracle_bounds(*bound_args, config.oracle_window_s)
    if config.coarse_window_s is not None:
        oracle["coarse"] = oracle_bounds(*bound_args, config.coarse_window_s)
    return rows, oracle, timelines, results


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


def oracle_k_opt(
    requests: Sequence[Request], embeddings: np.ndarray, thresholds: Thresholds, warm
) -> np.ndarray:
    """K_opt with every earlier prompt of the tenant cached at arrival: the most any policy sees."""
    out = np.zeros(len(requests), dtype=int)
    by_tenant: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_tenant.setdefault(r.tenant, []).append(i)
    for tenant, ids in by_tenant.items():
        index = CacheIndex(dim=embeddings.shape[1])
        if warm is not None and tenant == requests[0].tenant:
            for p, v in zip(*warm, strict=True):
                index.insert(tenant, p, v, (), 0.0)
        res = replay([requests[i].prompt for i in ids], embeddings[ids], thresholds, index, tenant)
        out[ids] = res.k_opt
    return out


def config_dict(config: CompareConfig, **extra: object) -> dict:
    return {
        **asdict(config),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()},
    }
