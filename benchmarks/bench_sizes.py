"""Every size in one server, simulated (issue 32): what a size mix costs and what shape-aware
placement buys.

Reference SDXL profile with the pixel-count scaling of ``steptime`` (a call per size a
step; each call pays the curve's fixed part), the Azure conversation trace stretched to each
rate, SLO 21 s, real MiniLM embeddings of the DiffusionDB prompts, seeds 1-3, 20 minutes a
point, the 60/20/20 mix of 1024x1024, 1152x896 and 896x1152 (the requests' sizes drawn per
seed; each size its own cache namespace). Four ways to serve it, on 2 and 8 GPUs:

* ``one size``: every request at 1024x1024 (what the mix is measured against);
* ``cache split``: the mix's cache namespaces, every step timed as one size (what the mix
  costs the cache alone: fewer neighbours per size);
* ``shape-aware``: ``promptserve-step``, one server, placement weighing sizes;
* ``size-blind``: ``promptserve-step+blind``, one server, placement by member count alone;
* ``split``: one ``promptserve-step`` server per size, the GPUs split by the mix (largest
  remainders; a size left without a GPU has every request of it unserved).

Prints the table on stderr and one JSON line: per GPU count, rate and way, the mean effective
quality and violation ratio over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.profile import reference_profile
from promptserve.sim.compare import CompareConfig, sim_inputs
from promptserve.sim.simulator import simulate
from promptserve.workload import load_prompts, make_requests
from promptserve.workload.arrivals import read_trace_offsets, trace_arrivals
from promptserve.workload.looks import LookMix, parse_size_mix, sized_profile, with_looks

ROOT = Path(__file__).resolve().parents[1]
MIX = "1024x1024:0.6,1152x896:0.2,896x1152:0.2"
RATES = {2: (60, 80, 100), 8: (240, 320, 400)}  # queries/minute: light, loaded, overloaded
WAYS = ("one size", "cache split", "shape-aware", "size-blind", "split")
SLO_S, MINUTES = 21.0, 20.0
STATE: dict = {}


def split_gpus(shares, gpus: int) -> list[int]:
    """GPUs per size by its share, largest remainders (ties to the earlier size)."""
    exact = [s * gpus for s in shares]
    out = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: gpus - sum(out)]:
        out[i] += 1
    return out


def workload(rate: float, seed: int, mix: LookMix | None):
    prompts, vecs = STATE["prompts"], STATE["vecs"]
    times = trace_arrivals(STATE["trace"], rate, None)
    times = times[times < MINUTES * 60.0]
    requests = make_requests(prompts, times, SLO_S)
    emb = vecs[[r.id % len(prompts) for r in requests]]
    if mix is None:
        return requests, emb, reference_profile()
    return with_looks(requests, mix, seed), emb, sized_profile(reference_profile(), mix)


def run_one(policy: str, requests, emb, profile, gpus: int, seed: int, penalty: str) -> tuple:
    """(effective quality x requests, violations x requests, requests) of one server."""
    if not requests:
        return 0.0, 0.0, 0
    if gpus == 0:  # a size without a GPU: nothing of it is served
        return 0.0, float(len(requests)), len(requests)
    config = CompareConfig(gpus, SLO_S, penalty, seed)
    inputs = sim_inputs(requests, emb, profile, shipped_thresholds("minilm"), config)
    s = simulate(parse_policies(policy)[0], inputs).records.summary([])
    n = s["requests"]
    return s["effective_quality"] * n, s["slo_violation_ratio"] * n, n


def run(args: tuple) -> tuple:
    way, gpus, rate, seed, penalty = args
    mix = LookMix(*parse_size_mix(STATE["mix"]))
    if way == "one size":
        parts = [run_one("promptserve-step", *workload(rate, seed, None), gpus, seed, penalty)]
    elif way == "cache split":
        requests, emb, _ = workload(rate, seed, mix)
        requests = [dataclasses.replace(r, shape=0) for r in requests]
        parts = [
            run_one("promptserve-step", requests, emb, reference_profile(), gpus, seed, penalty)
        ]
    elif way in ("shape-aware", "size-blind"):
        policy = "promptserve-step" if way == "shape-aware" else "promptserve-step+blind"
        parts = [run_one(policy, *workload(rate, seed, mix), gpus, seed, penalty)]
    else:
        requests, emb, profile = workload(rate, seed, mix)
        split = split_gpus(mix.size_weights, gpus)
        parts = []
        for shape, share in enumerate(split):
            rows = [i for i, r in enumerate(requests) if r.shape == shape]
            mine = [requests[i] for i in rows]
            parts.append(
                run_one("promptserve-step", mine, emb[rows], profile, share, seed, penalty)
            )
    n = sum(p[2] for p in parts)
    return (
        way,
        gpus,
        rate,
        seed,
        penalty,
        sum(p[0] for p in parts) / n,
        sum(p[1] for p in parts) / n,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default=MIX, help="SIZE:SHARE,... (the first is the model's own)")
    parser.add_argument("--gpus", default="2,8")
    parser.add_argument("--penalties", default="mild")
    parser.add_argument("--seeds", default="1,2,3")
    args = parser.parse_args()
    STATE["mix"] = args.mix
    STATE["prompts"] = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    STATE["vecs"] = make_embedder("minilm", ROOT / ".promptserve").embed(STATE["prompts"])
    STATE["trace"] = read_trace_offsets(ROOT / "data/AzureLLMInferenceTrace_conv.csv")
    jobs = [
        (way, int(g), rate, int(seed), pen)
        for g in args.gpus.split(",")
        for rate in RATES.get(int(g), tuple(r * int(g) // 2 for r in RATES[2]))
        for pen in args.penalties.split(",")
        for seed in args.seeds.split(",")
        for way in WAYS
    ]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(run, jobs))
    cells: dict = {}
    for way, gpus, rate, _seed, pen, eq, viol in done:
        cells.setdefault((gpus, pen, rate), {}).setdefault(way, []).append((eq, viol))
    out: dict = {}
    for (gpus, pen, rate), row in sorted(cells.items()):
        eq = {w: round(float(np.mean([e for e, _ in v])), 2) for w, v in row.items()}
        viol = {w: round(float(np.mean([x for _, x in v])), 4) for w, v in row.items()}
        out.setdefault(f"{gpus} GPUs", {}).setdefault(pen, {})[f"conv{rate}"] = {
            "effective_quality": eq,
            "violation_ratio": viol,
            "aware_minus_blind": round(eq["shape-aware"] - eq["size-blind"], 2),
            "aware_minus_split": round(eq["shape-aware"] - eq["split"], 2),
        }
        print(
            f"{gpus} GPUs {pen:5s} conv{rate:<4d} "
            + "  ".join(f"{w} {eq[w]:6.2f} ({viol[w]:.3f})" for w in WAYS),
            file=sys.stderr,
        )
    print(json.dumps({"bench": "sizes", "mix": args.mix, "points": out}))


if __name__ == "__main__":
    main()
