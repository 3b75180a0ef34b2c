"""Sharded ingress on Ray under sustained load: two ingress replicas over four modelled
workers, a closed-loop client process per tenant (one on each replica's shard); every
request must be answered (nothing stranded in the router), and image links must reach their
image from either replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from promptserve.distributed.tenant_router import SESSION_HEADER, SESSION_HEADER_ENV
from promptserve.policy.shards import ShardRing
from promptserve.server import ServerConfig
from promptserve.server.live import free_port

SECONDS = 15.0
CLIENTS_PER_TENANT = 4
TIMEOUT_S = 60.0  # a request with no answer by then is stranded


def _load(url: str, key: str) -> dict:
    cmd = [
        sys.executable, "-m", "promptserve.loadgen.closedloop", "--url", url,
        "--clients", str(CLIENTS_PER_TENANT), "--seconds", str(SECONDS),
        "--api-key", key, "--timeout-s", str(TIMEOUT_S),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def run() -> dict:
    import ray
    from ray import serve

    from promptserve.distributed import RaySettings, run_on_ray

    os.environ.setdefault(SESSION_HEADER_ENV, SESSION_HEADER)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ring = ShardRing(2)
    names = [f"tenant-{i}" for i in range(20)]
    tenants = [next(t for t in names if ring.shard_of(t) == s) for s in (0, 1)]
    keys = {f"sk-reliability-{t}": t for t in tenants}
    cfg = ServerConfig(
        model="sdxl-reference", backend="modeled", speedup=20.0, embedder="hashing",
        cache_dir=Path(tempfile.mkdtemp()), slo_s=60, workers=4, api_keys=keys,
    )  # fmt: skip
    settings = RaySettings(num_cpus=2, worker_cpus=0.25, port=free_port(), ingress_replicas=2)
    try:
        url = run_on_ray(cfg, settings)
        links = []
        for key in keys:  # warm, one at a time (routing stats polled), and keep a link each
            r = httpx.post(
                f"{url}/v1/images/generations",
                json={"prompt": "warm", "response_format": "url"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            )
            if r.status_code != 200:
                raise RuntimeError(f"warm-up answered {r.status_code}: {r.text}")
            links.append(r.json()["data"][0]["url"])
        procs = [_load(url, key) for key in keys]
        parts = [json.loads(p.communicate(timeout=SECONDS + 3 * TIMEOUT_S)[0]) for p in procs]
        fetched = [httpx.get(f"{url}{link}", timeout=30).status_code for link in links * 4]
    finally:
        serve.shutdown()
        ray.shutdown()
    errors: dict[str, int] = {}
    for part in parts:
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {
        "ingress_replicas": 2,
        "clients": CLIENTS_PER_TENANT * len(keys),
        "seconds": SECONDS,
        "answered": sum(len(p["latencies_s"]) for p in parts),
        "unanswered": sum(p["unanswered"] for p in parts),
        "errors": errors,
        "image_links_fetched": fetched.count(200),
        "image_links_asked": len(fetched),
    }
