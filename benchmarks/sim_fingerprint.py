"""Fingerprints of simulated runs, to show a refactor left the simulator's behaviour alone.

Every policy, plain and ``+shed+admit``, on Poisson 60 and 110 qpm and the conversation trace
at 60 qpm (2 GPUs, 6-8 minutes), under the mild and the steep penalty: each run's records
(status, finish time, level, quality, K_opt per request) hashed. ``--out F`` keeps the
per-run hashes; ``--against F`` names the runs whose hash moved. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import POLICIES, Setting, get_policy
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.workload import generate_arrivals, load_prompts, make_requests, parse_arrival_spec

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = (
    ("poisson", 60, 8),
    ("poisson", 110, 6),
    (f"trace:{ROOT / 'data/AzureLLMInferenceTrace_conv.csv'}", 60, 8),
)
FIELDS = ("status", "finish_s", "level", "quality", "k_opt")


def fingerprints(gpus: int = 2, seed: int = 1) -> dict[str, str]:
    profile = reference_profile()
    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    row = {p: i for i, p in enumerate(prompts)}
    out = {}
    for spec, rate, minutes in WORKLOADS:
        times = generate_arrivals(
            parse_arrival_spec(spec), rate_qpm=rate, minutes=minutes, seed=seed
        )
        requests = make_requests(prompts, times, 21.0)
        emb = vecs[[row[r.prompt] for r in requests]]
        for penalty in ("mild", "steep"):
            qm = quality_model(profile.levels, profile.quality, penalty)
            setting = Setting((profile,) * gpus, qm.matrix(), 21.0)
            inputs = SimInputs(requests, emb, setting, qm, shipped_thresholds("minilm"), seed)
            for name in sorted(POLICIES):
                for layer in ("", "+shed+admit"):
                    records = simulate(get_policy(name + layer), inputs).records
                    h = hashlib.sha256()
                    for f in FIELDS:
                        h.update(np.ascontiguousarray(getattr(records, f)).tobytes())
                    out[f"{spec.split(':')[0]}-{rate}-{penalty}-{name}{layer}"] = h.hexdigest()[:16]
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the per-run hashes here (JSON)")
    parser.add_argument("--against", type=Path, help="compare with hashes written by --out")
    args = parser.parse_args()
    runs = fingerprints()
    digest = hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()[:16]
    report: dict = {"bench": "sim_fingerprint", "runs": len(runs), "digest": digest}
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1, sort_keys=True))
    if args.against:
        before = json.loads(args.against.read_text())
        report["moved"] = sorted(k for k in runs if before.get(k) != runs[k])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
