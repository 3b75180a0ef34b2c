"""A load generator for a live server: the workload of ``simulate``, sent over HTTP on its
arrival times, recorded into the simulator's own ``Records`` so that a live run and a simulated
run of the same workload report the same figures side by side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import httpx
import numpy as np

from promptserve.policy.types import Status
from promptserve.sim.records import Records
from promptserve.types import Request


async def replay_live(
    url: str,
    requests: Sequence[Request],
    api_key: str | None = None,
    max_in_flight: int = 256,
    on_done: Callable[[], None] | None = None,
) -> Records:
    """Send each request at its arrival time (seconds from now); wait for every answer."""
    recs = Records.empty(
        np.array([r.arrival_s for r in requests]), np.array([r.deadline_s for r in requests])
    )
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(max_in_flight)
    t0 = time.monotonic()

    async def one(client: httpx.AsyncClient, i: int, req: Request) -> None:
        await asyncio.sleep(max(0.0, req.arrival_s - (time.monotonic() - t0)))
        async with gate:
            body = {"prompt": req.prompt, "deadline_ms": int(max(req.slo_s, 0.1) * 1000)}
            try:
                r = await client.post(
                    f"{url}/v1/images/generations",
                    json=body,
                    headers=headers,
                    timeout=req.slo_s * 4 + 30,
                )
            except httpx.HTTPError:
                recs.status[i] = int(Status.DROPPED)
                return
            finally:
                if on_done is not None:
                    on_done()
        done = time.monotonic() - t0
        if r.status_code == 200:
            meta = r.json()["data"][0]["promptserve"]
            recs.status[i] = int(Status.SERVED)
            recs.finish_s[i] = done
            recs.level[i] = meta["level_k"]
            recs.k_opt[i] = meta["k_opt"]
            recs.quality[i] = meta["predicted_quality"]
        else:
            recs.status[i] = int(Status.REFUSED if r.status_code == 429 else Status.DROPPED)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=max_in_flight)) as client:
        await asyncio.gather(*(one(client, i, r) for i, r in enumerate(requests)))
    return recs


def read_metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of the server's ``/metrics`` (0 when the series has no sample yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0
