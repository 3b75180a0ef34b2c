"""Simulator speed: simulated requests per second of wall time, per policy.

Argus shape compressed 10x (about 19,600 requests), 8 GPUs, reference profile, DiffusionDB
prompts with real MiniLM embeddings (computed before the clock starts). The run includes the
real cache index (a lookup per arrival, an insert per served prompt) and the policy core.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import POLICIES, Setting
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.workload import generate_arrivals, load_prompts, make_requests, parse_arrival_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile = reference_profile()
    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    times = generate_arrivals(parse_arrival_spec("argus"), time_scale=10, seed=0)
    requests = make_requests(prompts, times, 21.0)
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    row = {p: i for i, p in enumerate(prompts)}
    emb = vecs[[row[r.prompt] for r in requests]]
    qm = quality_model(profile.levels, profile.quality)
    inputs = SimInputs(
        requests, emb, Setting((profile,) * 8, qm.matrix(), 21.0), qm, shipped_thresholds("minilm")
    )
    out: dict = {"bench": "sim", "requests": len(requests)}
    total_t = 0.0
    for name, policy in POLICIES.items():
        t0 = time.perf_counter()
        simulate(policy, inputs)
        dt = time.perf_counter() - t0
        total_t += dt
        out[f"{name}_requests_per_s"] = round(len(requests) / dt)
    out["all_policies_requests_per_s"] = round(len(requests) * len(POLICIES) / total_t)
    out["min_requests_per_s"] = min(v for k, v in out.items() if k.endswith("_requests_per_s"))
    out["note"] = "wall clock on a shared 2-core machine"
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
