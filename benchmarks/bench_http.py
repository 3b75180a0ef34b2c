"""What the control plane costs per request: ``promptserve serve`` on the modelled backend at
~0 s per batch (4 workers, hashing embedder, every prompt distinct, so every answer writes its
latents), in a process of its own, loaded by 16 closed-loop clients on raw keep-alive sockets
in another (``promptserve.loadgen.closedloop``: ~0.05 ms of CPU a request, so the figure is the
server's, not the client's). Prints one JSON line per policy family: requests/s, client latency
and the answer's own queue time (p50, p99), the server's CPU (cores, and ms a request, from
``/proc``), and its mean time per request in each stage of the request path
(``promptserve_stage_seconds_total`` over ``promptserve_stage_requests``: embed, lookup,
intake, queue, run, cache_write; the rest of the client's latency is HTTP, parsing and
encoding). ``floor_requests_per_s`` is ``GET /healthz`` on the same server: the HTTP stack's own
ceiling on this machine.

``--server-src DIR`` serves another checkout's ``src`` (its ``promptserve`` on PYTHONPATH) with
this one's client, for a side-by-side before/after on one machine in one sitting."""

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

from promptserve.loadgen import read_metric
from promptserve.server.live import start_server, stop

CLIENTS = 16
SECONDS = 20.0
STAGES = ("embed", "lookup", "intake", "queue", "run", "cache_write")


def server_args(policy: str, quiet: bool) -> list[str]:
    """The modelled SDXL engine at ~0 s a batch, 4 workers, hashing embedder."""
    args = ["--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing"]
    args += ["--slo", "60", "--speedup", "1e6", "--workers", "4", "--policy", policy]
    return args + (["--no-access-log"] if quiet else [])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(
    url: str, clients: int, seconds: float, get: str | None = None, api_key: str | None = None
) -> dict:
    cmd = [sys.executable, "-m", "promptserve.loadgen.closedloop", "--url", url]
    cmd += ["--clients", str(clients), "--seconds", str(seconds)]
    cmd += ["--get", get] if get else []
    cmd += ["--api-key", api_key] if api_key else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout)


def stage_means_ms(url: str) -> dict[str, float | None]:
    out = {}
    for stage in STAGES:
        seconds = read_metric(url, "promptserve_stage_seconds_total", {"stage": stage})
        n = read_metric(url, "promptserve_stage_requests", {"stage": stage})
        out[stage] = round(seconds / n * 1e3, 3) if n else None
    return out


def measure(policy: str, clients: int, seconds: float, src: Path | None) -> dict:
    env = {"PYTHONPATH": str(src)} if src else None
    quiet = src is None  # another checkout may predate --no-access-log
    proc, url = start_server(server_args(policy, quiet), Path(tempfile.mkdtemp()), env=env)
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        result = load(url, clients, seconds)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        stages = stage_means_ms(url)
        floor = load(url, clients, min(seconds, 5.0), get="/healthz")
    finally:
        stop(proc)
    lat_ms = np.array(result["latencies_s"]) * 1e3
    queue_ms = np.array(result["queue_ms"])
    served = len(lat_ms)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "requests_per_s": round(served / result["seconds"], 1),
        "errors": result["errors"],
        "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 2),
        "server_queue_ms_p50": round(float(np.percentile(queue_ms, 50)), 2),
        "server_queue_ms_p99": round(float(np.percentile(queue_ms, 99)), 2),
        "server_cpu_cores": None if cpu is None else round(cpu / (t1 - t0), 2),
        "server_cpu_ms_per_request": None if cpu is None else round(cpu / served * 1e3, 2),
        "stage_ms_mean": stages,
        "floor_requests_per_s": round(len(floor["latencies_s"]) / floor["seconds"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=CLIENTS)
    p.add_argument("--seconds", type=float, default=SECONDS)
    p.add_argument("--policies", default="promptserve,promptserve-step")
    p.add_argument("--server-src", type=Path, default=None, help="another checkout's src folder")
    a = p.parse_args()
    src = a.server_src.resolve() if a.server_src else None
    if src is not None and not (src / "promptserve").is_dir():
        p.error(f"--server-src {src} holds no promptserve package")
    policies = a.policies.split(",")
    figures = {name: measure(name, a.clients, a.seconds, src) for name in policies}
    first, *rest = policies
    print(
        json.dumps(
            {
                "bench": "http",
                "backend": "modeled, ~0 s per batch",
                "workers": 4,
                "clients": a.clients,
                "seconds": a.seconds,
                "policy": first,
                **figures[first],
                **{("step_level" if n == "promptserve-step" else n): figures[n] for n in rest},
                "server_src": str(src) if src else "this checkout",
                "note": "2-core machine; server and client in processes of their own",
            }
        )
    )


if __name__ == "__main__":
    main()
