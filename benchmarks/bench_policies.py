"""All policies and the oracle on the Argus shape, under both quality-penalty presets.

8 GPUs, reference SDXL profile, DiffusionDB prompts with real MiniLM embeddings, SLO 21 s
(5x the full-quality latency), the 840-minute shape compressed 10x. Prints one JSON line with
each policy's figures, the oracle bound, and the share of Argus's gap to the oracle's
effective quality that promptserve closes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import POLICIES
from promptserve.profile import reference_profile
from promptserve.sim.compare import CompareConfig, compare
from promptserve.workload import generate_arrivals, load_prompts, make_requests, parse_arrival_spec

ROOT = Path(__file__).resolve().parents[1]
KEEP = (
    "effective_quality",
    "mean_quality",
    "slo_violation_ratio",
    "refused",
    "dropped",
    "served_late",
    "goodput_qpm",
    "p99_latency_s",
)


def run(arrivals: str, time_scale: float, seed: int) -> dict:
    profile = reference_profile()
    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    times = generate_arrivals(parse_arrival_spec(arrivals), time_scale=time_scale, seed=seed)
    requests = make_requests(prompts, times, 21.0)
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    row = {p: i for i, p in enumerate(prompts)}
    emb = vecs[[row[r.prompt] for r in requests]]
    out: dict = {
        "bench": "policies",
        "arrivals": arrivals,
        "time_scale": time_scale,
        "requests": len(requests),
        "gpus": 8,
        "slo_s": 21.0,
    }
    for penalty in ("mild", "steep"):
        rows, oracle, _, _ = compare(
            list(POLICIES.values()),
            requests,
            emb,
            profile,
            shipped_thresholds("minilm"),
            CompareConfig(8, 21.0, penalty, seed),  # type: ignore[arg-type]
        )
        bound = oracle["effective_quality_upper_bound"]
        ours, theirs = rows["promptserve"]["effective_quality"], rows["argus"]["effective_quality"]
        out[penalty] = {
            "policies": {name: {k: r[k] for k in KEEP} for name, r in rows.items()},
            "oracle": oracle,
            "gap_closed_vs_argus": round((ours - theirs) / (bound - theirs), 3)
            if bound > theirs
            else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arrivals", default="argus", help="arrival spec (default: the Argus shape)"
    )
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(args.arrivals, args.time_scale, args.seed)))


if __name__ == "__main__":
    main()
