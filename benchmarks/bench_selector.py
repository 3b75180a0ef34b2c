"""The selector (``+select``) against each fixed candidate and the best fair rival, held out.

The points of ``bench_policies.py`` on the held-out split (Poisson 40-100 and the conversation
trace 40-120 queries/minute, 2 GPUs, SLO 21 s, 20 minutes, seeds 1-3), under ``--penalty``
(steep by default, mild as well with ``--penalty steep,mild``), feature caching off and on.
The candidates as fixed policies: the price (``promptserve-step``), every request at its
fastest pair (``continuous-ht+shed+admit``, ``+max-r`` with feature caching), and with feature
caching the price at the longest interval (``promptserve-step+max-r``); the best fair rival is
``policies.is_fair_rival``'s, as in the headline.

``--sweeps argus-8gpu`` adds the published Argus shape at 10x on 8 GPUs (long: about 19,600
requests a run).

Then the selector's CPU: thread CPU of its replays per simulated minute, Poisson at 50
queries/minute per GPU for 5 minutes, at 2 and 64 GPUs, and for 2 minutes at 4,096 GPUs in 64
shards of 64, where the selector replays one shard's traffic and switches every shard
(``--cpu-gpus``).

``--docs`` writes ``docs/figures/selector.json``, ``--out FILE`` the same JSON anywhere. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

import bench_policies as bp
from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.policy.policies import fair_policies
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.sim.figures import FIGURES
from promptserve.sim.sharded import simulate_sharded
from promptserve.sim.simulator import simulate
from promptserve.sim.sweep import SweepConfig, point_inputs, run_sweep
from promptserve.workload import load_prompts

ROOT = Path(__file__).resolve().parents[1]
SELECT = "promptserve-step+select"
# the selector's candidates as fixed policies, per feature caching (``selector.candidates``)
FIXED = {
    "off": ["promptserve-step", "continuous-ht+shed+admit"],
    "on": ["promptserve-step", "continuous-ht+shed+admit+max-r", "promptserve-step+max-r"],
}


SHARD_GPUS = 64  # GPUs per shard of the CPU measure's sharded runs (``bench_shards.py``'s)
ARGUS = "argus-8gpu"  # the published shape at 10x, 8 GPUs (``--sweeps`` names it to run it)


def _run(args: tuple) -> tuple[tuple, dict]:
    penalty, fc, sweep, rate, seeds = args
    bp.STATE["penalty"] = penalty
    fair = fair_policies(fc == "on").split(",")
    bp.STATE["extra"] = [SELECT, *(p for p in FIXED[fc] if p not in fair)]
    if sweep == ARGUS:
        return (penalty, fc, sweep, rate), _argus(penalty, fc, seeds)
    return (penalty, fc, sweep, rate), bp._job(("held-out", fc, sweep, rate, seeds))[1]


def _argus(penalty: str, fc: str, seeds: tuple[int, ...]) -> dict:
    config = SweepConfig(
        "argus",
        (None,),
        seeds,
        8,
        bp.SLO_S,
        penalty,
        None,
        10.0,
        split="held-out",  # type: ignore[arg-type]
    )
    profile = with_feature_cache(reference_profile()) if fc == "on" else reference_profile()
    policies = parse_policies(",".join([fair_policies(fc == "on"), *bp.STATE["extra"]]))
    return run_sweep(
        policies, bp.STATE["prompts"], bp.STATE["vecs"], profile, shipped_thresholds("minilm"),
        config,
    )  # fmt: skip


def point(result: dict, fc: str) -> dict:
    row = bp.row_of(result)
    eq = row["effective_quality"]
    mean = {n: v["mean"] for n, v in eq.items()}
    rival = row["best_rival"]
    return {
        "rate_qpm": row["rate_qpm"],
        "select": mean[SELECT],
        "candidates": {n: mean[n] for n in FIXED[fc]},
        "best_rival": rival,
        "rival": mean[rival],
        "select_minus_rival": round(mean[SELECT] - mean[rival], 2),
        "select_minus_price": round(mean[SELECT] - mean["promptserve-step"], 2),
        "violations": {n: row["violation_ratio"][n] for n in (SELECT, rival, "promptserve-step")},
        "oracle": row["oracle"],
    }


def cpu(gpus: int, prompts: list[str], vecs: np.ndarray) -> dict:
    """The selector's replays: CPU seconds per simulated minute at ``gpus`` GPUs. Past
    ``SHARD_GPUS``, sharded (a shard per ``SHARD_GPUS``, a tenant per two GPUs, as
    ``bench_shards.py``), the selector replaying one shard; for 2 minutes there, 5 below."""
    rate, shards = 50.0 * gpus, gpus // SHARD_GPUS
    minutes = 2.0 if shards > 1 else 5.0
    config = SweepConfig("poisson", (rate,), (1,), gpus, 21.0, "steep", minutes, split="held-out")
    inputs, _ = point_inputs(
        prompts, vecs, reference_profile(), shipped_thresholds("minilm"), config, rate, 1
    )
    policy = parse_policies(SELECT)[0]
    t0 = time.thread_time()
    if shards > 1:
        tenants = [replace(r, tenant=f"tenant-{r.id % (gpus // 2)}") for r in inputs.requests]
        result, _ = simulate_sharded(policy, replace(inputs, requests=tenants), shards)
    else:
        result = simulate(policy, inputs)
    run = time.thread_time() - t0
    span_min = (inputs.requests[-1].arrival_s - inputs.requests[0].arrival_s) / 60.0
    return {
        "gpus": gpus,
        "shards": max(shards, 1),
        "rate_qpm": rate,
        "selections": len(result.choices),
        "selector_cpu_s_per_sim_minute": round(result.selector_cpu_s / span_min, 3),
        "share_of_one_core": round(result.selector_cpu_s / (span_min * 60.0), 4),
        "run_cpu_s": round(run, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--penalty", default="steep", help="steep, mild or steep,mild")
    parser.add_argument("--feature-cache", default="off,on")
    parser.add_argument("--sweeps", default=",".join(bp.SWEEPS))
    parser.add_argument("--cpu-gpus", default="2,64,4096", help="past 64: sharded, 64 a shard")
    parser.add_argument("--docs", action="store_true", help="write docs/figures/selector.json")
    parser.add_argument("--out", default=None, help="also write the whole JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    bp.STATE["prompts"], bp.STATE["vecs"] = prompts, vecs
    jobs = [
        (pen, fc, sweep, float(rate), seeds)
        for pen in args.penalty.split(",")
        for fc in args.feature_cache.split(",")
        for sweep in args.sweeps.split(",")
        for rate in (bp.SWEEPS[sweep][1] if sweep != ARGUS else (0,))
    ]
    jobs.sort(key=lambda j: -j[3])
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=ctx) as pool:
        done = dict(pool.map(_run, jobs))
    results: dict = {}
    for (pen, fc, sweep, _), res in sorted(done.items(), key=lambda kv: kv[0][:3] + (kv[0][3],)):
        results.setdefault(pen, {}).setdefault(fc, {}).setdefault(sweep, []).append(point(res, fc))
    flat = [
        p for by_fc in results.values() for sw in by_fc.values() for ps in sw.values() for p in ps
    ]
    out = {
        "bench": "selector",
        "command": " ".join(["python", "benchmarks/bench_selector.py", *sys.argv[1:]]),
        "split": "held-out",
        "seeds": list(seeds),
        "results": results,
        "select_minus_rival_min": min(p["select_minus_rival"] for p in flat),
        "select_minus_rival_mean": round(
            float(np.mean([p["select_minus_rival"] for p in flat])), 2
        ),
        "select_minus_price_min": min(p["select_minus_price"] for p in flat),
        "select_minus_price_mean": round(
            float(np.mean([p["select_minus_price"] for p in flat])), 2
        ),
        "cpu": [cpu(int(g), prompts, vecs) for g in args.cpu_gpus.split(",") if g],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.docs:
        (ROOT / FIGURES / "selector.json").write_text(json.dumps(out, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
