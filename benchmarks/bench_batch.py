"""Background work beside interactive traffic: what a batch stream costs the people waiting,
and how much of what they leave it uses.

The conversation trace at 60 and 100 queries/minute mean, 2 GPUs, SLO 21 s, steep penalty,
the held-out split, seeds 1, 2, 3 (20 minutes a run), feature caching off and on;
``promptserve-step`` alone, then with a background stream (``--batch``) that alone would fill
the GPUs: as many jobs per minute as the GPUs finish at the lane's width
(``policy.step.background.width``), every step full, even if each skips the most a neighbour
allows (``fill_qpm``), each due an hour after it is submitted.

Two lanes are run side by side: ``apart`` (the shipped rule: a GPU runs background members
only with no interactive one, and interactive joins pack onto GPUs already busy with
interactive members while each keeps half the SLO to spare, ``Placement.packed``) and ``beside`` (``Background.beside_share`` = 0.5: background
members also fill GPUs whose interactive members keep half their slack, while the price is 0
and nobody waits).

What is measured, over the interactive requests' span (``Ledger.until_s``):
- the interactive effective quality and violations with the stream, against without it;
- ``left_share``: the GPU-seconds the interactive members did not take (a shared step split
  by its members), of all; ``left_used``: the share of those the background members took
  (both pooled over the seeds: at a busy point a seed leaves a few seconds only);
- ``slots_left``: the member-steps the GPUs run at the lane's width less the interactive
  ones, of all; ``slots_used``: the background member-steps against those (feature caching off only: with it a step's cost
  depends on its kind, so member-steps are not a capacity);
- ``images_per_gpu_hour``: background images finished within the span, per GPU-hour.

Writes ``docs/figures/batch.json`` and rewrites the table in ``docs/batch.md`` with ``--docs``.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import parse_policies
from promptserve.policy.step.background import width
from promptserve.policy.types import Status
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.sim.events import EventRun
from promptserve.sim.figures import rewrite
from promptserve.sim.sweep import SweepConfig, point_inputs
from promptserve.steptime import step_profile
from promptserve.workload import load_prompts
from promptserve.workload.batch import BatchMix

ROOT = Path(__file__).resolve().parents[1]
SLO_S, GPUS, MINUTES, DEADLINE_S = 21.0, 2, 20.0, 3600.0
TRACE = f"trace:{ROOT / 'data/AzureLLMInferenceTrace_conv.csv'}"
LEAD = "promptserve-step"
STATE: dict = {}


def profile_for(fc: str):  # noqa: ANN201 - a Profile
    return with_feature_cache(reference_profile()) if fc == "on" else reference_profile()


def fill_qpm(fc: str) -> float:
    """Background jobs per minute that alone fill the GPUs even if each skips the most a
    cached neighbour allows (N - K_max steps, every step full, at the lane's width)."""
    steps = step_profile(profile_for(fc))
    n = width(steps)
    return GPUS * 60.0 * steps.steps_per_s(n) / (steps.total_steps - steps.levels[-1])


def run(fc: str, rate: float, seed: int, lane: str | None) -> dict:
    """One run: without the stream (``lane`` None) or with it, under that lane's rule."""
    batch = None
    if lane is not None:
        share = fill_qpm(fc) / (fill_qpm(fc) + rate)
        batch = BatchMix(share, DEADLINE_S)
    config = SweepConfig(
        TRACE, (rate,), (seed,), GPUS, SLO_S, "steep", MINUTES, split="held-out", batch=batch
    )
    inputs, _ = point_inputs(
        STATE["prompts"], STATE["vecs"], profile_for(fc), shipped_thresholds("minilm"),
        config, rate, seed,
    )  # fmt: skip
    sim = EventRun(parse_policies(LEAD)[0], inputs, None)
    lane_of = sim.sched.background  # type: ignore[attr-defined]
    if lane == "beside":
        lane_of.beside_share = 0.5
    arrivals = np.array([r.arrival_s for r in inputs.requests if not r.batch])
    lane_of.ledger.until_s = until = float(arrivals.max())
    result = sim.run()
    summary = result.records.summary(result.planner_ms)
    row = {
        "effective_quality": summary["effective_quality"],
        "violations": summary["slo_violation_ratio"],
    }
    if lane is None:
        return row
    ledger, rec = lane_of.ledger, result.records
    gpu_s = GPUS * (until - float(arrivals.min()))
    profile = sim.sched.profile  # type: ignore[attr-defined]
    full_rate = profile.steps_per_s(lane_of.width)
    done = rec.batch & (rec.status == Status.SERVED) & (rec.finish_s <= until)
    row |= {  # sums, pooled over seeds before any ratio (a seed may leave seconds only)
        "gpu_s": gpu_s,
        "left_s": gpu_s - ledger.interactive_s,
        "used_s": ledger.background_s,
        "slots": full_rate * gpu_s,
        "left_slots": full_rate * gpu_s - ledger.interactive_steps,
        "used_slots": ledger.background_steps,
        "images": float(done.sum()),
        "pauses": ledger.pauses,
    }
    return row


def _job(args: tuple[str, float, int, str | None]) -> tuple[tuple, dict]:
    return args, run(*args)


def mean(rows: list[dict], key: str) -> float:
    return round(float(np.mean([r[key] for r in rows])), 3)


def pooled(rows: list[dict], part: str, whole: str) -> float:
    return round(sum(r[part] for r in rows) / max(sum(r[whole] for r in rows), 1e-9), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--rates", default="60,100", help="queries/minute, comma-separated")
    parser.add_argument("--feature-cache", default="off,on", help="off, on or off,on")
    parser.add_argument("--docs", action="store_true", help="write docs/figures/batch.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rates = tuple(float(r) for r in args.rates.split(","))
    fcs = args.feature_cache.split(",")
    STATE["prompts"] = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt")
    STATE["vecs"] = make_embedder("minilm", ROOT / ".promptserve").embed(STATE["prompts"])
    lanes = (None, "apart", "beside")
    jobs = [(fc, r, s, lane) for fc in fcs for r in rates for s in seeds for lane in lanes]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("fork")  # the workers share the embeddings
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=ctx) as pool:
        done = dict(pool.map(_job, jobs))
    points = []
    for fc in fcs:
        for rate in rates:
            alone = [done[(fc, rate, s, None)] for s in seeds]
            point: dict = {
                "feature_cache": fc,
                "rate_qpm": rate,
                "batch_qpm": round(fill_qpm(fc), 1),
                "alone": mean(alone, "effective_quality"),
                "alone_violations": mean(alone, "violations"),
            }
            for lane in lanes[1:]:
                rows = [done[(fc, rate, s, lane)] for s in seeds]
                eq = mean(rows, "effective_quality")
                point[lane] = {
                    "effective_quality": eq,
                    "change": round(eq - point["alone"], 3),
                    "violations": mean(rows, "violations"),
                    "left_share": pooled(rows, "left_s", "gpu_s"),
                    "left_used": pooled(rows, "used_s", "left_s"),
                    "slots_left": pooled(rows, "left_slots", "slots") if fc == "off" else None,
                    "slots_used": pooled(rows, "used_slots", "left_slots") if fc == "off" else None,
                    "images_per_gpu_hour": round(
                        sum(r["images"] for r in rows) / (sum(r["gpu_s"] for r in rows) / 3600), 1
                    ),
                    "pauses": mean(rows, "pauses"),
                }
            points.append(point)
    out = {
        "bench": "batch",
        "command": "python benchmarks/bench_batch.py --docs",
        "arrivals": "conversation trace, held-out",
        "gpus": GPUS,
        "slo_s": SLO_S,
        "deadline_s": DEADLINE_S,
        "seeds": list(seeds),
        "points": points,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.docs:
        (ROOT / "docs/figures/batch.json").write_text(json.dumps(out, indent=1) + "\n")
        rewrite(ROOT / "docs/batch.md", ROOT)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
