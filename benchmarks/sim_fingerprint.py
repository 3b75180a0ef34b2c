"""Fingerprints of simulated runs, to show a refactor left the simulator's behaviour alone.

Every policy, plain and ``+shed+admit``, on Poisson 60 and 110 qpm and the conversation trace
at 60 qpm (2 GPUs, 6-8 minutes), under the mild and the steep penalty: each run's records
(status, finish time, level, quality, K_opt per request) hashed. ``--wide`` adds the paths
users get beyond the reference profile: the step-level policies with feature caching on (the
serve default), with a size mix, with bounded adapter residency, and sharded (4 shards).
``--out F`` keeps the per-run hashes; ``--against F`` names the runs whose hash moved. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
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
STEP = ("promptserve-step", "continuous-ht+shed+admit", "continuous-ha+shed+admit+max-r")


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


def _digest(records) -> str:  # noqa: ANN001 - Records
    h = hashlib.sha256()
    for f in FIELDS:
        h.update(np.ascontiguousarray(getattr(records, f)).tobytes())
    return h.hexdigest()[:16]


def wide(seed: int = 1) -> dict[str, str]:
    """The step-level paths past the reference profile, Poisson 80 and the trace at 60 qpm."""
    from promptserve.profile import with_feature_cache
    from promptserve.sim.compare import CompareConfig, sim_inputs
    from promptserve.sim.sharded import simulate_sharded
    from promptserve.workload.looks import LookMix, parse_size_mix, sized_profile, with_looks

    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    vecs = make_embedder("minilm", ROOT / ".promptserve").embed(prompts)
    row = {p: i for i, p in enumerate(prompts)}
    base = reference_profile()
    looks = {
        "fc": (with_feature_cache(base, 0.077, 4), LookMix()),
        "sizes": (base, LookMix(*parse_size_mix("1024x1024:0.6,1152x896:0.2,768x768:0.2"))),
        "lora": (base, LookMix(adapters=12, zipf=1.0, resident=4, load_s=0.4)),
    }
    out = {}
    for spec, rate in (
        ("poisson", 80),
        (f"trace:{ROOT / 'data/AzureLLMInferenceTrace_conv.csv'}", 60),
    ):
        times = generate_arrivals(parse_arrival_spec(spec), rate_qpm=rate, minutes=6, seed=seed)
        plain = make_requests(prompts, times, 21.0)
        emb = vecs[[row[r.prompt] for r in plain]]
        config = CompareConfig(2, 21.0, "mild", seed)
        for look, (profile, mix) in looks.items():
            requests = with_looks(plain, mix, seed)
            inputs = sim_inputs(
                requests, emb, sized_profile(profile, mix), shipped_thresholds("minilm"), config
            )
            for name in STEP:
                records = simulate(get_policy(name), inputs).records
                out[f"{spec.split(':')[0]}-{rate}-{look}-{name}"] = _digest(records)
        many = dataclasses.replace(config, gpus=8)
        inputs = sim_inputs(plain, emb, base, shipped_thresholds("minilm"), many)
        result, moved = simulate_sharded(get_policy("promptserve-step"), inputs, 4)
        out[f"{spec.split(':')[0]}-{rate}-sharded"] = f"{_digest(result.records)}-{moved}"
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the per-run hashes here (JSON)")
    parser.add_argument("--against", type=Path, help="compare with hashes written by --out")
    parser.add_argument("--wide", action="store_true", help="add the step-level paths' runs")
    args = parser.parse_args()
    runs = fingerprints()
    if args.wide:
        runs |= wide()
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
