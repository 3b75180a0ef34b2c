"""Simulator speed: simulated requests per second of wall time, per policy.

Argus shape compressed 10x (about 19,600 requests), 8 GPUs, reference profile, DiffusionDB
prompts with real MiniLM embeddings (computed before the clock starts). The run includes the
real cache index (a lookup per arrival, an insert per served prompt) and the policy core; each
policy's time is the better of two runs in one process (the same for ``--against``'s code).

``--policies a,b`` times those only (default: every policy). ``--against REV`` also times the
same policies on the code of git revision REV (a temporary worktree, run by this interpreter
with that tree's ``src`` first on the path), alternating old and new ``--repeats`` times, so
the ratio is measured side by side on one machine. ``native`` says whether each ran the
compiled hot path (``make native``; ``PROMPTSERVE_NATIVE=0`` times the Python). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(policies: list[str]) -> dict[str, int]:
    """Requests per second of each policy's run, on the code this interpreter imports."""
    from promptserve.cache.embed import make_embedder
    from promptserve.cache.thresholds import shipped_thresholds
    from promptserve.policy import Setting, get_policy
    from promptserve.profile import reference_profile
    from promptserve.quality import quality_model
    from promptserve.sim.simulator import SimInputs, simulate
    from promptserve.workload import (
        generate_arrivals,
        load_prompts,
        make_requests,
        parse_arrival_spec,
    )

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
    out: dict = {"requests": len(requests), "native": native_state()}
    for name in policies:
        best = float("inf")
        for _ in range(2):  # the first run after the embeddings pays for BLAS's spinning threads
            t0 = time.perf_counter()
            simulate(get_policy(name), inputs)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(len(requests) / best)
    return out


def native_state() -> str:
    """Whether the compiled hot path ran (``promptserve.native``; absent before it existed)."""
    try:
        from promptserve import native
    except ImportError:
        return "absent"
    return native.ACTIVE


def elsewhere(tree: Path, policies: list[str]) -> dict[str, int]:
    """``measure`` in a subprocess on ``tree``'s code (its ``src`` first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_sim, json;"
        f"print(json.dumps(bench_sim.measure({policies!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from promptserve.policy import POLICIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--against", default=None, help="a git revision to time side by side")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policies = [p for p in args.policies.split(",") if p]
    out: dict = {"bench": "sim", "gpus": 8}
    if args.against is None:
        got = measure(policies)
        out["requests"], out["native"] = got.pop("requests"), got.pop("native")
        out |= {f"{n}_requests_per_s": v for n, v in got.items()}
        out["min_requests_per_s"] = min(got.values())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against],
                check=True, capture_output=True,
            )  # fmt: skip
            try:
                runs: dict[str, list[dict]] = {"old": [], "new": []}
                for _ in range(args.repeats):  # alternating: the machine's load hits both
                    runs["old"].append(elsewhere(tree, policies))
                    runs["new"].append(elsewhere(ROOT, policies))
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False, capture_output=True,
                )  # fmt: skip
        out["against"] = args.against
        out["requests"] = runs["new"][0]["requests"]
        out["native"] = {"old": runs["old"][0]["native"], "new": runs["new"][0]["native"]}
        for name in policies:
            old = max(r[name] for r in runs["old"])
            new = max(r[name] for r in runs["new"])
            out[name] = {"old_requests_per_s": old, "new_requests_per_s": new,
                         "speedup": round(new / old, 2)}  # fmt: skip
    out["note"] = "wall clock on a shared machine" + (
        ", the best of the repeats" if args.against else ""
    )
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
