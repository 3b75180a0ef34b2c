"""Edits beside generations: promptserve-step against the best fair rival, and what pricing an
edit at its own start step buys.

The conversation trace at 80 queries/minute mean, 2 GPUs, SLO 21 s, steep penalty, the
held-out split, seeds 1, 2, 3 (20 minutes a run): 30% of the requests are edits at a strength
uniform in 0.3-0.8 (``--edits 0.3:0.3-0.8``), feature caching off and on. Every fair policy
runs on the same requests (``policies.fair_policies``); the best fair rival is taken per
feature-caching setting on the mean over seeds.

"From step 0" runs promptserve-step on the same requests with every edit at strength 1.0: the
same edits, each costing a whole run, as a server that cannot start an edit from its own image
must run it. ``edit_steps_saved`` is the share of the edits' denoising steps that starting at
their own step leaves out (the mean of their start steps over N).

Writes ``docs/figures/edits.json`` with ``--docs``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.policy.policies import LEAD, fair_policies
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.sim.sweep import SweepConfig, point_inputs, run_sweep, summarise
from promptserve.strength import start_step
from promptserve.workload import load_prompts
from promptserve.workload.edits import EditMix

ROOT = Path(__file__).resolve().parents[1]
SLO_S, GPUS, MINUTES, RATE = 21.0, 2, 20.0, 80.0
TRACE = f"trace:{ROOT / 'data/AzureLLMInferenceTrace_conv.csv'}"
STATE: dict = {}


def config(mix: EditMix, seeds: tuple[int, ...]) -> SweepConfig:
    return SweepConfig(
        TRACE, (RATE,), seeds, GPUS, SLO_S, "steep", MINUTES, split="held-out", edits=mix
    )


def profile_for(fc: str):  # noqa: ANN201 - a Profile
    return with_feature_cache(reference_profile()) if fc == "on" else reference_profile()


def _job(args: tuple[str, str, tuple[int, ...]]) -> tuple[tuple[str, str], dict]:
    fc, variant, seeds = args
    mix = STATE["mix"] if variant == "own start" else EditMix(STATE["mix"].share, 1.0, 1.0)
    names = fair_policies(fc == "on") if variant == "own start" else LEAD
    result = run_sweep(
        parse_policies(names), STATE["prompts"], STATE["vecs"], profile_for(fc),
        shipped_thresholds("minilm"), config(mix, seeds),
    )  # fmt: skip
    return (fc, variant), result


def saved_share(seeds: tuple[int, ...]) -> float:
    """The share of the edits' steps their own start leaves out, over every seed's edits."""
    steps, starts = 0, 0
    for seed in seeds:
        inputs, _ = point_inputs(
            STATE["prompts"], STATE["vecs"], reference_profile(), shipped_thresholds("minilm"),
            config(STATE["mix"], seeds), RATE, seed,
        )  # fmt: skip
        n = inputs.setting.profiles[0].total_steps
        for r in inputs.requests:
            if r.strength is not None:
                steps, starts = steps + n, starts + start_step(n, r.strength)
    return round(starts / max(steps, 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--edits", default="0.3:0.3-0.8", help="SHARE:LO-HI, as simulate's")
    parser.add_argument("--feature-cache", default="off,on", help="off, on or off,on")
    parser.add_argument("--docs", action="store_true", help="write docs/figures/edits.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from promptserve.workload.edits import parse_edits

    seeds = tuple(int(s) for s in args.seeds.split(","))
    STATE["mix"] = parse_edits(args.edits)
    STATE["prompts"] = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    STATE["vecs"] = make_embedder("minilm", ROOT / ".promptserve").embed(STATE["prompts"])
    fcs = args.feature_cache.split(",")
    jobs = [(fc, v, seeds) for fc in fcs for v in ("own start", "from step 0")]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("fork")  # the workers share the embeddings
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=ctx) as pool:
        done = dict(pool.map(_job, jobs))
    out: dict = {
        "bench": "edits",
        "command": "python benchmarks/bench_edits.py --docs",
        "arrivals": "conversation trace, held-out",
        "rate_qpm": RATE,
        "gpus": GPUS,
        "slo_s": SLO_S,
        "edits": args.edits,
        "seeds": list(seeds),
        "edit_steps_saved": saved_share(seeds),
        "feature_cache": {},
    }
    for fc in fcs:
        (own,) = summarise(done[(fc, "own start")])
        (zero,) = summarise(done[(fc, "from step 0")])
        rival = own["best_fair_baseline"]["policy"]
        lead = own["policies"][LEAD]["effective_quality"]["mean"]
        rival_q = own["policies"][rival]["effective_quality"]["mean"]
        from_zero = zero["policies"][LEAD]["effective_quality"]["mean"]
        out["feature_cache"][fc] = {
            LEAD: lead,
            "violation_ratio": own["policies"][LEAD]["slo_violation_ratio"]["mean"],
            "best_fair_rival": rival,
            "rival": rival_q,
            "margin": round(lead - rival_q, 2),
            "every_edit_from_step_0": from_zero,
            "gain_of_own_start": round(lead - from_zero, 2),
            "per_seed": [
                p["policies"][LEAD]["effective_quality"] for p in done[(fc, "own start")]["points"]
            ],
            "policies": {n: v["effective_quality"]["mean"] for n, v in own["policies"].items()},
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.docs:
        path = ROOT / "docs/figures/edits.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_seed"}))


if __name__ == "__main__":
    main()
