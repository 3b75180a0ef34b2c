"""Work for nobody: images computed after their client went away, or for a request whose answer
is already a refusal (the probe of issue 35 found 123 of 200 images computed for clients that
had dropped after 0.5 s, and an ``n = 10`` request computing nine images, then answering 429).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from promptserve.loadgen import read_metric
from reliability.server import start_server, stop

# two modelled GPUs at 4x the reference: a full generation takes 1.05 s alone, far past the drop
ARGS = ["--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing"]
ARGS += ["--workers", "2", "--speedup", "4", "--slo", "600"]  # a long SLO: all are admitted
# full steps only: with feature caching ten images fit the deadline below at a cheaper interval
# and are served (what it is for, ``benchmarks/bench_feature_cache.py``), not refused whole
ARGS += ["--feature-cache", "off"]
OUTCOMES = ("served", "late", "refused", "dropped", "cancelled", "failed")


def outcomes(url: str) -> dict[str, float]:
    return {o: read_metric(url, "promptserve_requests_total", {"outcome": o}) for o in OUTCOMES}


def computed(counts: dict[str, float]) -> int:
    return int(counts["served"] + counts["late"])


def until_settled(url: str, images: int, timeout_s: float = 120.0) -> dict[str, float]:
    """The outcome counts once every one of ``images`` has its end; a count short of them at
    the timeout is returned too, and ``settled`` says which (the check fails on it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = outcomes(url)
        if sum(counts.values()) >= images or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def settled(counts: dict[str, float], images: int) -> bool:
    return sum(counts.values()) >= images


async def dropping_clients(url: str, requests: int, n: int, after_s: float) -> int:
    """``requests`` clients each ask ``n`` images and hang up after ``after_s``; how many got
    an answer before they did."""

    async def one(i: int) -> bool:
        async with httpx.AsyncClient(timeout=after_s) as client:
            try:
                body = {"prompt": f"an abandoned request number {i}", "n": n}
                await client.post(f"{url}/v1/images/generations", json=body)
                return True
            except httpx.TimeoutException:  # the client hangs up
                return False

    return sum(await asyncio.gather(*(one(i) for i in range(requests))))


def run(requests: int = 20, n: int = 10, after_s: float = 0.5) -> dict:
    proc, url = start_server(ARGS, Path(tempfile.mkdtemp(prefix="abandoned-")))
    try:
        answered = asyncio.run(dropping_clients(url, requests, n, after_s))
        dropped = until_settled(url, requests * n)
        # a deadline that holds a few of ten full generations, not all: refused as a whole
        # (the planner reads the reference's 4.2 s a full generation, not the 4x speed-up)
        body = {"prompt": "ten ships in a harbour", "n": n, "deadline_ms": 12_000}
        whole = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        after = until_settled(url, requests * n + n)
    finally:
        stop(proc)
    return {
        "dropping_clients": {
            "requests": requests,
            "images": requests * n,
            "answered_before_the_drop": answered,
            "computed_for_nobody": computed(dropped),
            "cancelled": int(dropped["cancelled"]),
            "every_image_ended": settled(dropped, requests * n),
        },
        "partly_refused": {
            "status": whole.status_code,
            "images": n,
            "computed_for_nobody": computed(after) - computed(dropped)
            if whole.status_code != 200
            else 0,
            "every_image_ended": settled(after, requests * n + n),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run()))
