"""A burst at 10x capacity against the server on the modelled backend."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from promptserve.loadgen import read_metric
from promptserve.profile import reference_profile
from reliability.server import peak_rss_mb, rss_mb, start_server, stop

WORKERS, SPEEDUP, SLO_S = 2, 4.0, 20.0
OUTCOMES = ("served", "late", "refused", "dropped")


# Bounded memory under a burst (docs/security.md): admission keeps the queue to what can finish
# within the SLO, and the server holds at most --max-connections-per-client (1024 here) requests
# open from this one client, each its body (under 64 KiB) and its answer (a modelled image of a
# few KiB) with the objects around them: under 0.5 MiB each, so the peak may grow by at most
# 512 MiB over the idle server, however long the burst lasts.
RSS_GROWTH_MB = 512.0


def capacity_per_s() -> float:
    """The most the workers can serve: every GPU at the fastest level in full batches."""
    p = reference_profile()
    return WORKERS * SPEEDUP * p.throughput_qpm(p.levels[-1], p.max_batch) / 60.0


async def burst(url: str, rate_per_s: float, seconds: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, int(rate_per_s * seconds * 1.2)))
    arrivals = arrivals[arrivals < seconds]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=SLO_S * 3, limits=limits) as client:
        start = time.monotonic()

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            t0 = time.monotonic()
            try:
                r = await client.post(
                    f"{url}/v1/images/generations",
                    json={"prompt": f"burst prompt {i} of a city at night"},
                )
                results.append(
                    {
                        "status": r.status_code,
                        "latency_s": time.monotonic() - t0,
                        "retry_after": r.headers.get("retry-after"),
                    }
                )
            except httpx.HTTPError as exc:
                results.append({"status": None, "error": type(exc).__name__})

        await asyncio.gather(*(one(i, float(at)) for i, at in enumerate(arrivals)))
    return results


def run(seconds: float = 15.0, factor: float = 10.0) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="overload-"))
    args = ["--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing"]
    args += ["--workers", str(WORKERS), "--speedup", str(SPEEDUP), "--slo", str(SLO_S)]
    args += ["--max-connections-per-client", "1024"]  # one load generator, up to 512 clients
    proc, url = start_server(args, cache)
    try:
        idle_mb = rss_mb(proc.pid)
        rate = factor * capacity_per_s()
        results = asyncio.run(burst(url, rate, seconds))
        alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        server = {
            o: read_metric(url, "promptserve_requests_total", {"outcome": o}) for o in OUTCOMES
        }
        rss = peak_rss_mb(proc.pid)
    finally:
        stop(proc)
    sent = len(results)
    statuses = [r["status"] for r in results]
    accepted = [r for r in results if r["status"] not in (429, None)]
    on_time = [r for r in accepted if r["status"] == 200 and r["latency_s"] <= SLO_S]
    refused = [r for r in results if r["status"] == 429]
    answered = int(sum(server.values()))
    return {
        "capacity_upper_per_s": round(capacity_per_s(), 2),
        "offered_per_s": round(rate, 1),
        "sent": sent,
        "accepted": len(accepted),
        "refused_429": len(refused),
        "refused_without_retry_after": sum(1 for r in refused if not r["retry_after"]),
        "dropped_503": statuses.count(503),
        "server_errors_5xx": sum(1 for s in statuses if s is not None and s >= 500 and s != 503),
        "no_answer": statuses.count(None),
        "answered_twice": max(0, answered - sent),
        "lost": statuses.count(None) + max(0, sent - answered),
        "accepted_on_time_ratio": round(len(on_time) / len(accepted), 4) if accepted else None,
        "server_up_after": alive,
        "peak_rss_mb": rss,
        "rss_before_burst_mb": idle_mb,
        "rss_growth_mb": round(rss - idle_mb, 1),
        "rss_growth_bound_mb": RSS_GROWTH_MB,
    }
