"""A sharded control plane against one global scheduler, at thousands of GPUs (issue 30).

The conversation trace scaled up by superposition (``workload/scaled.py``): one copy per two
GPUs, each at ``--rate`` queries/minute (the 2-GPU sweep's rate), each a tenant of its own at
its own phase, so the fleet sees many services' bursts overlap. The same requests, the same
cache index and the same step-level policy run twice through the step simulator:

* ``global``: one ``StepScheduler`` over every GPU;
* ``sharded``: ``--shards`` schedulers, tenants on a consistent-hash ring, each over its own
  slice of the GPUs, a global controller moving GPUs between slices every ``--controller-s``.

Reference SDXL profile, SLO 21 s, real MiniLM embeddings of the DiffusionDB prompts. Prints
progress on stderr and one JSON line: per run the effective quality, the violation ratio, the
simulator's own speed (requests simulated per second of wall time) and the GPUs moved; the
gap (global - sharded, target within 1 point). The two runs go in two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.profile import reference_profile
from promptserve.sim.compare import CompareConfig, sim_inputs
from promptserve.sim.sharded import CONTROLLER_S, simulate_sharded
from promptserve.sim.simulator import simulate
from promptserve.workload import load_prompts
from promptserve.workload.arrivals import read_trace_offsets
from promptserve.workload.scaled import Rows, superposed_arrivals, tenant_requests

ROOT = Path(__file__).resolve().parents[1]
SLO_S = 21.0
STATE: dict = {}


def build(args: argparse.Namespace) -> None:
    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    offsets = read_trace_offsets(ROOT / "data/AzureLLMInferenceTrace_conv.csv")
    times, copy_of = superposed_arrivals(
        offsets, args.gpus // 2, args.rate, args.minutes, args.seed
    )
    requests, rows = tenant_requests(prompts, times, copy_of, SLO_S, args.seed)
    config = CompareConfig(args.gpus, SLO_S, args.penalty, args.seed)
    inputs = sim_inputs(
        requests, Rows(vecs, rows), reference_profile(), shipped_thresholds("minilm"), config
    )
    STATE.update(inputs=inputs, policy=parse_policies(args.policy)[0])


def run(job: tuple[str, int, float]) -> dict:
    name, shards, controller_s = job
    inputs, policy = STATE["inputs"], STATE["policy"]
    t0 = time.perf_counter()
    if shards <= 0:
        result, moved = simulate(policy, inputs), 0
    else:
        result, moved = simulate_sharded(policy, inputs, shards, controller_s)
    wall = time.perf_counter() - t0
    s = result.records.summary(result.planner_ms)
    n = len(inputs.requests)
    print(f"{name}: {s['effective_quality']} in {wall:.0f} s", file=sys.stderr, flush=True)
    return {
        "effective_quality": s["effective_quality"],
        "slo_violation_ratio": s["slo_violation_ratio"],
        "mean_quality": s.get("mean_quality"),
        "wall_s": round(wall, 1),
        "sim_requests_per_s": round(n / wall),
        "gpus_moved": moved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--rate", type=float, default=80.0, help="qpm per copy (2 GPUs)")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--controller-s", type=float, default=CONTROLLER_S)
    parser.add_argument("--penalty", choices=("mild", "steep"), default="mild")
    parser.add_argument("--policy", default="promptserve-step")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.gpus < 2 or args.shards < 1 or args.gpus < args.shards:
        parser.error("--gpus must be >= 2 and >= --shards >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    build(args)
    n = len(STATE["inputs"].requests)
    print(
        f"{n} requests from {args.gpus // 2} tenants, built in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    jobs = [("global", 0, args.controller_s), ("sharded", args.shards, args.controller_s)]
    with ProcessPoolExecutor(2) as pool:  # fork: the children share the built inputs
        results = dict(zip([j[0] for j in jobs], pool.map(run, jobs), strict=True))
    gap = results["global"]["effective_quality"] - results["sharded"]["effective_quality"]
    print(
        json.dumps(
            {
                "bench": "shards",
                "gpus": args.gpus,
                "shards": args.shards,
                "tenants": args.gpus // 2,
                "requests": n,
                "rate_qpm_per_2_gpus": args.rate,
                "minutes": args.minutes,
                "controller_s": args.controller_s,
                "penalty": args.penalty,
                "policy": args.policy,
                "seed": args.seed,
                **results,
                "gap_points": round(gap, 3),
                "within_1_point": gap <= 1.0,
                "note": "wall clock on a shared 2-core machine, the two runs side by side",
            }
        )
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
