"""Whether one tenant can time another's prompts: the probe of issue 35, as a stage.

Tenant A generates prompts; tenant B then sends each of them, and a fresh control prompt beside
it, with a deadline no run can meet, so both are refused before any generation. Anything that
remembers A's prompts without B's tenant in its key (an embedding cache, say) answers B's seen
prompt sooner. The stage times many such pairs, in both orders, and reports both medians and
how often the seen prompt was the faster of its pair.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from math import comb
from pathlib import Path

import httpx

from reliability.server import start_server, stop

KEYS = {"key-tenant-a-0123456789": "tenant-a", "key-tenant-b-0123456789": "tenant-b"}
UNMEETABLE_MS = 100  # the least deadline the API takes: refused (400) before generation


def sign_test_p(wins: int, pairs: int) -> float:
    """One-sided p of ``wins`` or more of ``pairs`` coin flips: how unlikely the seen prompt
    wins this often if tenant A's history changes nothing."""
    return sum(comb(pairs, k) for k in range(wins, pairs + 1)) / 2**pairs


def separated(seen_ms: list[float], fresh_ms: list[float], wins: int) -> bool:
    """A side channel both ways of looking agree on: the seen prompt is faster in significantly
    more pairs than chance (p < 0.01) and its median is at least 20% below the control's.
    Either alone is noise on a shared machine; the probe saw 100% of pairs and 3-10x medians."""
    gap = 1.0 - statistics.median(seen_ms) / statistics.median(fresh_ms)
    return sign_test_p(wins, len(seen_ms)) < 0.01 and gap >= 0.2


def _timed(client: httpx.Client, url: str, key: str, prompt: str) -> tuple[int, float]:
    body = {"prompt": prompt, "deadline_ms": UNMEETABLE_MS}
    t0 = time.perf_counter()
    r = client.post(url, json=body, headers={"authorization": f"Bearer {key}"})
    return r.status_code, (time.perf_counter() - t0) * 1e3


def run(pairs: int = 24) -> dict:
    a, b = list(KEYS)
    keys = ",".join(f"{k}:{t}" for k, t in KEYS.items())
    # the real embedder: a hashing one embeds in microseconds and would hide the channel
    args = ["--model", "tiny", "--embedder", "minilm", "--workers", "1", "--slo", "300"]
    proc, url = start_server(args, Path(tempfile.mkdtemp()), env={"PROMPTSERVE_API_KEYS": keys})
    gen = f"{url}/v1/images/generations"
    seen_ms: list[float] = []
    fresh_ms: list[float] = []
    statuses: set[int] = set()
    try:
        with httpx.Client(timeout=120) as client:
            for i in range(2):  # warm both tenants' paths (connection, first embedder call)
                _timed(client, gen, b, f"warm-up prompt {i} for tenant b")
            for i in range(pairs):
                seen = f"a lighthouse on a cliff at dusk, study number {i}"
                fresh = f"a market street in the rain at noon, sketch number {i}"
                r = client.post(
                    gen, json={"prompt": seen}, headers={"authorization": f"Bearer {a}"}
                )
                statuses.add(r.status_code)
                order = [(seen, seen_ms), (fresh, fresh_ms)]
                for prompt, into in order if i % 2 == 0 else order[::-1]:
                    status, ms = _timed(client, gen, b, prompt)
                    statuses.add(status)
                    into.append(ms)
    finally:
        stop(proc)
    wins = sum(1 for s, f in zip(seen_ms, fresh_ms, strict=True) if s < f)
    return {
        "pairs": pairs,
        "statuses": sorted(statuses),
        "median_seen_ms": round(statistics.median(seen_ms), 2),
        "median_fresh_ms": round(statistics.median(fresh_ms), 2),
        "seen_faster_pairs": wins,
        "sign_test_p": round(sign_test_p(wins, pairs), 5),
        "separated": separated(seen_ms, fresh_ms, wins),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run()))
