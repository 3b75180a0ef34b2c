"""Step-level serving on bursty and Poisson load, tuned and held-out (issue 29).

2 GPUs, reference SDXL profile, SLO 21 s, real MiniLM embeddings of the DiffusionDB prompts,
both quality-penalty presets, seeds 1-3, 20 minutes per point:

* ``conv``: the Azure conversation trace's arrivals stretched to 40-120 queries/minute mean;
* ``poisson``: Poisson arrivals at 60, 80 and 100 queries/minute.

Two splits (``workload.splits``), so that a rule tuned on one can be judged on the other:
``tune`` (the first half of the prompt file and of the trace's span, Poisson seeds 1-3) and
``held-out`` (the second halves, Poisson seeds 1001-1003); a seed picks where the replay of the
prompts and the trace starts, so each seed is a different run.

``--feature-cache``: every run on the reference with DeepCache's cached step and intervals 1-4
(``profile.with_feature_cache``), for comparing policies that choose an interval with the rivals
that take the longest for every request (``+max-r``); see ``bench_feature_cache.py``.

No oracle (``bench_policies.py`` has the bounds): this compares step-level serving with its
strongest rival on the same execution, queue and admission. Prints a table per split on stderr
and one JSON line: per split, penalty and point the mean effective quality and violation ratio
per policy, the margin over the best other policy, and the count of wins, ties (within 0.1)
and losses.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.sim.compare import CompareConfig, sim_inputs
from promptserve.sim.simulator import simulate
from promptserve.workload import load_prompts, make_requests
from promptserve.workload.arrivals import poisson_arrivals, read_trace_offsets, trace_arrivals
from promptserve.workload.splits import arrival_seed, phase, prompt_order, trace_window

ROOT = Path(__file__).resolve().parents[1]
OURS = "promptserve-step"
POLICIES = f"{OURS},continuous-ht+shed+admit"
POINTS = [("conv", r) for r in (40, 60, 80, 100, 120)] + [("poisson", r) for r in (60, 80, 100)]
SLO_S, GPUS, MINUTES, TIE = 21.0, 2, 20.0, 0.1
STATE: dict = {}


def arrivals(kind: str, rate: float, seed: int, split: str) -> np.ndarray:
    if kind == "poisson":
        return poisson_arrivals(rate, MINUTES, arrival_seed(split, seed))  # type: ignore[arg-type]
    offsets = trace_window(STATE["trace"], split)  # type: ignore[arg-type]
    return trace_arrivals(offsets, rate, MINUTES, phase(seed))


def run(args: tuple) -> tuple:
    policy, kind, rate, seed, penalty, split = args
    prompts, vecs = STATE["prompts"], STATE["vecs"]
    order = prompt_order(len(prompts), split, seed)
    chosen = [prompts[i] for i in order]
    requests = make_requests(chosen, arrivals(kind, rate, seed, split), SLO_S)
    emb = vecs[order][[r.id % len(chosen) for r in requests]]
    config = CompareConfig(GPUS, SLO_S, penalty, seed)
    profile = reference_profile()
    if STATE.get("feature_cache"):
        profile = with_feature_cache(profile)
    inputs = sim_inputs(requests, emb, profile, shipped_thresholds("minilm"), config)
    res = simulate(parse_policies(policy)[0], inputs)
    s = res.records.summary(res.planner_ms)
    return split, penalty, f"{kind}{rate}", policy, s["effective_quality"], s["slo_violation_ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=POLICIES, help="comma-separated, ours first")
    parser.add_argument("--splits", default="tune,held-out")
    parser.add_argument("--penalties", default="mild,steep")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--feature-cache", action="store_true", help="intervals 1-4 at DeepCache's SDXL cost"
    )
    parser.add_argument("--points", default="", help="KIND:RATE,... (default: all eight)")
    args = parser.parse_args()
    policies = [p.name for p in parse_policies(args.policies)]
    STATE["feature_cache"] = args.feature_cache
    points = POINTS
    if args.points:
        points = [(k, int(r)) for k, r in (p.split(":") for p in args.points.split(","))]
    STATE["prompts"] = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    STATE["vecs"] = make_embedder("minilm", ROOT / ".promptserve").embed(STATE["prompts"])
    STATE["trace"] = read_trace_offsets(ROOT / "data/AzureLLMInferenceTrace_conv.csv")
    jobs = [
        (p, kind, rate, int(seed), pen, split)
        for split in args.splits.split(",")
        for pen in args.penalties.split(",")
        for kind, rate in points
        for seed in args.seeds.split(",")
        for p in policies
    ]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(run, jobs))
    cells: dict = {}
    for split, pen, point, policy, eq, viol in done:
        cells.setdefault((split, pen, point), {}).setdefault(policy, []).append((eq, viol))
    out: dict = {}
    for (split, pen, point), row in cells.items():
        eq = {p: round(float(np.mean([e for e, _ in v])), 2) for p, v in row.items()}
        viol = {p: round(float(np.mean([x for _, x in v])), 4) for p, v in row.items()}
        others = {p: e for p, e in eq.items() if p != policies[0]}
        margin = round(eq[policies[0]] - max(others.values()), 2) if others else None
        out.setdefault(split, {}).setdefault(pen, {})[point] = {
            "effective_quality": eq,
            "violation_ratio": viol,
            "ours_minus_best_other": margin,
        }
        print(
            f"{split:8s} {pen:5s} {point:10s} "
            + "  ".join(f"{p} {eq[p]:6.2f} ({viol[p]:.3f})" for p in policies)
            + (f"  margin {margin:+.2f}" if margin is not None else ""),
            file=sys.stderr,
        )
    margins = [
        pt["ours_minus_best_other"]
        for split in out.values()
        for pen in split.values()
        for pt in pen.values()
        if pt["ours_minus_best_other"] is not None
    ]
    print(
        json.dumps(
            {
                "bench": "bursts",
                "ours": policies[0],
                "feature_cache": args.feature_cache,
                "points": out,
                "wins": sum(m > TIE for m in margins),
                "ties": sum(abs(m) <= TIE for m in margins),
                "losses": sum(m < -TIE for m in margins),
            }
        )
    )


if __name__ == "__main__":
    main()
