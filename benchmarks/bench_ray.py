"""Ray Serve against the single-process server, and the routing choice.

1. The same closed-loop workload (modelled SDXL latencies, 20x faster than the profile; 2
   workers; hashing embedder) through the single-process server and through Ray Serve on this
   machine: throughput ratio and the latency Ray adds per request.
2. Routing: per-replica handles (what ``RayWorkers`` does) against a custom ``RequestRouter``
   that routes by the level a replica reports (``LevelRouter``): per-call latency, and the share
   of requests sent to a replica at the wrong level right after a re-plan swaps two levels.
3. Ingress replicas (``--ingress-replicas``): one against two over the same 4 modelled workers
   at 20x, two tenants (one on each shard of the ring), a closed-loop client process per
   tenant; runs alternate (1, 2, 1, 2) and the ratio is of the means. Every run reports the
   requests left unanswered (none may be: the tenant router keeps every request it takes).

``--only NAME`` runs one part (serving, routing, ingress). Prints one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException

from bench_http import CLIENTS, load
from promptserve.distributed import RaySettings, run_on_ray
from promptserve.distributed.level_router import LevelReplica, LevelRouter
from promptserve.distributed.tenant_router import SESSION_HEADER, SESSION_HEADER_ENV
from promptserve.policy.shards import ShardRing
from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer, free_port

SECONDS = 20.0
STATS_PERIOD_S = 1.0


def modeled_config(speedup: float, workers: int) -> ServerConfig:
    """The server on the modelled SDXL engine, hashing embedder, a fresh cache folder."""
    return ServerConfig(
        backend="modeled",
        model="sdxl-reference",
        embedder="hashing",
        cache_dir=Path(tempfile.mkdtemp()),
        slo_s=60,
        speedup=speedup,
        workers=workers,
    )


def summary(result: dict) -> dict:
    """The closed-loop client's figures (it runs in a process of its own)."""
    lat = result["latencies_s"]
    ms = np.array(lat) * 1e3
    return {
        "requests_per_s": round(len(lat) / result["seconds"], 2),
        "errors": sum(result["errors"].values()),
        "unanswered": result.get("unanswered", 0),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 1),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 1),
    }


def serving() -> dict:
    cfg = modeled_config(speedup=20.0, workers=2)
    with LiveServer(build_app(cfg)) as url:
        local = summary(load(url, CLIENTS, SECONDS))
    url = run_on_ray(cfg, RaySettings(num_cpus=2, worker_cpus=0.5, port=free_port()))
    on_ray = summary(load(url, CLIENTS, SECONDS))
    serve.delete("promptserve", _blocking=True)
    return {
        "single_process": local,
        "ray": on_ray,
        "throughput_ratio_ray_over_local": round(
            on_ray["requests_per_s"] / local["requests_per_s"], 3
        ),
        "added_latency_ms_p50": round(on_ray["latency_ms_p50"] - local["latency_ms_p50"], 1),
    }


def tenant_load(url: str, keys: list[str], seconds: float) -> dict:
    """One closed-loop client process per key, at once; their answers together."""
    with ThreadPoolExecutor(len(keys)) as pool:
        parts = list(pool.map(lambda k: load(url, CLIENTS // len(keys), seconds, api_key=k), keys))
    merged = {"seconds": seconds, "latencies_s": [], "errors": {}, "unanswered": 0}
    for part in parts:
        merged["latencies_s"] += part["latencies_s"]
        merged["unanswered"] += part["unanswered"]
        for code, n in part["errors"].items():
            merged["errors"][code] = merged["errors"].get(code, 0) + n
    return summary(merged)


def ingress_scaling(settings: RaySettings, seconds: float = SECONDS) -> dict:
    ring = ShardRing(2)
    names = [f"tenant-{i}" for i in range(20)]
    tenants = [next(t for t in names if ring.shard_of(t) == s) for s in (0, 1)]
    keys = {f"sk-{t}": t for t in tenants}
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for replicas in (1, 2, 1, 2):
        cfg = dataclasses.replace(modeled_config(speedup=20.0, workers=4), api_keys=keys)
        with contextlib.suppress(RayServeException):  # Serve starts with the first run
            serve.delete("promptserve", _blocking=True)
        url = run_on_ray(cfg, dataclasses.replace(settings, ingress_replicas=replicas))
        for key in keys:  # warm, one at a time: routing stats polled, engines built
            for i in range(3):
                httpx.post(
                    f"{url}/v1/images/generations",
                    json={"prompt": f"warm {i}"},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                ).raise_for_status()
        print(f"ingress replicas {replicas}: loading", file=sys.stderr, flush=True)
        runs[replicas].append(tenant_load(url, list(keys), seconds))
        print(f"ingress replicas {replicas}: {runs[replicas][-1]}", file=sys.stderr, flush=True)
    serve.delete("promptserve", _blocking=True)
    mean = {n: float(np.mean([r["requests_per_s"] for r in rs])) for n, rs in runs.items()}
    return {
        "one_ingress": runs[1],
        "two_ingress": runs[2],
        "requests_per_s_ratio_two_over_one": round(mean[2] / mean[1], 3),
        "unanswered": sum(r["unanswered"] for rs in runs.values() for r in rs),
        "tenants": tenants,
    }


def timed(calls) -> tuple[float, list]:
    out, ms = [], []
    for call in calls:
        t0 = time.perf_counter()
        out.append(call())
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(ms, 50)), out


def routing() -> dict:
    pool = serve.deployment(LevelReplica).options(
        name="pool",
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=LevelRouter, request_routing_stats_period_s=STATS_PERIOD_S
        ),
    )
    h = serve.run(pool.bind(), name="routing", route_prefix=None)
    ids = sorted({h.whoami.remote().result() for _ in range(40)})
    assert len(ids) == 2, ids
    for rid, level in zip(ids, (0, 10)):
        h.set_level.remote(level, replica=rid).result()
    time.sleep(3 * STATS_PERIOD_S)
    router_ms, got = timed([lambda: h.run.remote(level=0).result()] * 200)
    steady_wrong = sum(g != 0 for g in got)
    for rid, level in zip(ids, (10, 0)):  # a re-plan swaps the two levels
        h.set_level.remote(level, replica=rid).result()
    t_swap = time.monotonic()
    wrong, sent = 0, 0
    while time.monotonic() - t_swap < 2 * STATS_PERIOD_S:
        wrong += h.run.remote(level=0).result() != 0
        sent += 1
    serve.delete("routing", _blocking=True)

    solo = serve.deployment(LevelReplica).options(num_replicas=1, ray_actor_options={"num_cpus": 0})
    handles = [
        serve.run(solo.options(name=f"solo-{i}").bind(), name=f"solo-{i}", route_prefix=None)
        for i in range(2)
    ]
    for handle, level in zip(handles, (10, 0)):
        handle.set_level.remote(level).result()
    direct_ms, got = timed([lambda: handles[1].run.remote(level=0).result()] * 200)
    for i in range(2):
        serve.delete(f"solo-{i}", _blocking=True)
    return {
        "per_replica_handles": {
            "call_ms_p50": round(direct_ms, 2),
            "wrong_level": sum(g != 0 for g in got),
        },
        "request_router": {
            "call_ms_p50": round(router_ms, 2),
            "wrong_level_steady": steady_wrong,
            "stats_period_s": STATS_PERIOD_S,
            "after_swap": {"sent": sent, "wrong_level": int(wrong)},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("serving", "routing", "ingress"), default=None)
    only = parser.parse_args().only
    # as run_on_ray sets it for a local Ray: the tenant router reads the caller's key
    os.environ.setdefault(SESSION_HEADER_ENV, SESSION_HEADER)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out: dict = {"bench": "ray", "backend": "modeled SDXL at 20x", "workers": 2}
        if only in (None, "serving"):
            out.update(serving())
        if only in (None, "routing"):
            out["routing"] = routing()
        if only in (None, "ingress"):
            settings = RaySettings(num_cpus=2, worker_cpus=0.25, port=free_port())
            out["ingress_replicas"] = ingress_scaling(settings)
    finally:
        serve.shutdown()
        ray.shutdown()
    out["note"] = "2-core machine; client, ingress, proxy and replicas share it"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
