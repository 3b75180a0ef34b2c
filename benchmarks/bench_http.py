"""HTTP overhead: the modelled backend with (near) zero latency behind the real server on
localhost; closed-loop clients for a fixed time. Sustained requests/s and the per-request
latency the server adds (client-measured; compute is ~0). The hashing embedder is used so that
the figures are the server's own, not MiniLM's (which adds ~10 ms a prompt on this CPU).
Prints one JSON line, with the server's mean time per request in each stage of its request
path (``promptserve_stage_seconds_total`` over ``promptserve_stage_requests``: embed, lookup,
intake, queue, run, cache_write; the rest of the client's latency is HTTP, parsing and
encoding)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from promptserve.loadgen import read_metric
from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer

CLIENTS = 16
SECONDS = 20.0


async def load(url: str, seconds: float = SECONDS) -> tuple[list[float], list[float], int]:
    latencies, queue_ms, errors = [], [], 0
    stop = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient, n: int) -> None:
        nonlocal errors
        i = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = await c.post(
                f"{url}/v1/images/generations",
                json={"prompt": f"prompt {n} {i}", "deadline_ms": 60000},
            )
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                queue_ms.append(r.json()["data"][0]["promptserve"]["queue_ms"])
            else:
                errors += 1
            i += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as c:
        await asyncio.gather(*(client(c, n) for n in range(CLIENTS)))
    return latencies, queue_ms, errors


def modeled_config(speedup: float, workers: int, policy: str = "promptserve") -> ServerConfig:
    """The server on the modelled SDXL engine, hashing embedder, a fresh cache folder."""
    return ServerConfig(
        policy=policy,
        backend="modeled",
        model="sdxl-reference",
        embedder="hashing",
        cache_dir=Path(tempfile.mkdtemp()),
        slo_s=60,
        speedup=speedup,
        workers=workers,
    )


STAGES = ("embed", "lookup", "intake", "queue", "run", "cache_write")


def stage_means_ms(url: str) -> dict[str, float]:
    """The server's mean time per request in each stage of its request path (``/metrics``)."""
    out = {}
    for stage in STAGES:
        seconds = read_metric(url, "promptserve_stage_seconds_total", {"stage": stage})
        n = read_metric(url, "promptserve_stage_requests", {"stage": stage})
        out[stage] = round(seconds / n * 1e3, 3) if n else None
    return out


def measure(policy: str) -> dict:
    cfg = modeled_config(speedup=1e6, workers=4, policy=policy)
    with LiveServer(build_app(cfg)) as url:
        lat, queue_ms, errors = asyncio.run(load(url))
        stages = stage_means_ms(url)
    lat_ms = np.array(lat) * 1e3
    return {
        "requests_per_s": round(len(lat) / SECONDS, 1),
        "errors": errors,
        "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 2),
        "server_queue_ms_p50": round(float(np.percentile(queue_ms, 50)), 2),
        "server_queue_ms_p99": round(float(np.percentile(queue_ms, 99)), 2),
        "stage_ms_mean": stages,
    }


def main() -> None:
    pinned = measure("promptserve")
    step = measure("promptserve-step")
    print(
        json.dumps(
            {
                "bench": "http",
                "backend": "modeled, ~0 s per batch",
                "workers": 4,
                "clients": CLIENTS,
                "seconds": SECONDS,
                **pinned,
                "step_level": step,
                "note": "2-core machine; client and server share it; top level: promptserve",
            }
        )
    )


if __name__ == "__main__":
    main()
