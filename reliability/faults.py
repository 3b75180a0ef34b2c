"""Faults: a worker replica killed mid-batch (Ray, tiny and modelled engines), the process
SIGKILLed during a stream of cache writes, and a full disk during latent writes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from promptserve.loadgen import read_metric
from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer, free_port
from reliability.cache_writer import audit


def worker_kills(requests: int = 8) -> dict:
    """Per backend: every accepted request answered exactly once, the replica replaced."""
    import ray
    from ray import serve

    from promptserve.distributed import RaySettings, run_on_ray
    from promptserve.distributed.chaos import kill_busy_worker, wait_workers_up

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    settings = RaySettings(num_cpus=2, worker_cpus=0.5, port=free_port())
    out = {}
    try:
        for name, extra in (
            ("tiny", {"model": "tiny"}),
            ("modeled", {"model": "sdxl-reference", "backend": "modeled", "speedup": 2.0}),
        ):
            cfg = ServerConfig(
                embedder="hashing",
                workers=2,
                cache_dir=Path(tempfile.mkdtemp()),
                slo_s=300,
                **extra,
            )
            url = run_on_ray(cfg, settings)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)
            answers: list = []

            def ask(i: int, client=client, answers=answers) -> None:
                try:
                    client.images.generate(prompt=f"a kite over the sea, take {i}")
                    answers.append("ok")
                except Exception as exc:  # counted as a failure below
                    answers.append(type(exc).__name__)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(requests)]
            for t in threads:
                t.start()
            victim = kill_busy_worker(url, poll_s=0.01)
            for t in threads:
                t.join(timeout=240)
            served = read_metric(url, "promptserve_requests_total", {"outcome": "served"})
            late = read_metric(url, "promptserve_requests_total", {"outcome": "late"})
            replaced = wait_workers_up(url, 2)
            pids = {w["index"]: w["pid"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"]}
            out[name] = {
                "sent": requests,
                "answered": answers.count("ok"),
                "failed": len(answers) - answers.count("ok"),
                "unanswered": requests - len(answers),
                "answered_twice": max(0, int(served + late) - requests),
                "retried_after_kill": int(read_metric(url, "promptserve_requests_retried")),
                "killed_mid_batch": victim is not None,
                "replica_replaced": bool(
                    replaced and victim and pids.get(victim["index"]) != victim["pid"]
                ),
            }
            serve.delete("promptserve", _blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def _files(root: str) -> int:
    return sum(1 for _ in Path(root).glob("**/*.safetensors"))


def cache_crashes(rounds: int = 3) -> dict:
    root = tempfile.mkdtemp(prefix="crash-")
    totals = {
        "rounds": rounds,
        "entries": 0,
        "torn_served": 0,
        "index_matches_files": True,
        "dangling_before_repair": 0,
        "orphans_before_repair": 0,
        "rows_lost_on_reopen": 0,
        "writer_failed": 0,
    }
    for _ in range(rounds):
        before = _files(root)
        proc = subprocess.Popen(
            [sys.executable, "-m", "reliability.cache_writer", root], stderr=subprocess.DEVNULL
        )
        started = time.monotonic()  # killed mid-write: once it writes, not while it imports
        while _files(root) <= before and time.monotonic() - started < 60 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.uniform(0.2, 1.0))
        if proc.poll() is not None:  # it stopped by itself: a crash of the writer, not ours
            totals["writer_failed"] += 1
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen = audit(root)
        totals["entries"] = seen["entries"]
        totals["torn_served"] += seen["torn_served"]
        totals["index_matches_files"] &= seen["index_matches_files"]
        for key in ("dangling_before_repair", "orphans_before_repair", "rows_lost_on_reopen"):
            totals[key] += seen[key]
    shutil.rmtree(root, ignore_errors=True)
    return totals


def fill(path: Path) -> None:
    """Write until the file system refuses one more byte."""
    with open(path, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def full_disk(requests: int = 4) -> dict:
    """The cache folder on a small tmpfs, filled: answers go on, entries are skipped, one log."""
    mount = Path(tempfile.mkdtemp(prefix="fulldisk-"))
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode
        == 0
    )
    if not mounted:
        return {"skipped": "no permission to mount a tmpfs"}
    counter = _Count()
    logger = logging.getLogger("promptserve.cache.approx")
    logger.addHandler(counter)
    try:
        app = build_app(ServerConfig(model="tiny", embedder="hashing", cache_dir=mount, slo_s=120))
        with LiveServer(app) as url:
            fill(mount / "filler")
            statuses = [
                httpx.post(
                    f"{url}/v1/images/generations",
                    json={"prompt": f"a lantern in the fog, {i}"},
                    timeout=120,
                ).status_code
                for i in range(requests)
            ]
            skipped = read_metric(url, "promptserve_cache_skipped_writes")
    finally:
        logger.removeHandler(counter)
        subprocess.run(["umount", "-l", str(mount)])
    return {
        "sent": requests,
        "answered_200": statuses.count(200),
        "cache_writes_skipped": int(skipped),
        "errors_logged": len([m for m in counter.messages if "latent cache write failed" in m]),
    }
