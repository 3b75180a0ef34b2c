"""Fault injection for tests and the reliability suite: kill a worker replica mid-batch."""

from __future__ import annotations

import os
import signal
import time

import httpx

from promptserve.loadgen import read_metric


def kill_busy_worker(url: str, timeout_s: float = 60.0, poll_s: float = 0.02) -> dict | None:
    """SIGKILL the process of a worker replica while it runs a batch; returns its last ping
    (index, pid, level, running), or None when no batch ran within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = httpx.get(f"{url}/v1/cluster", timeout=10).json()["workers"]
        busy = [w for w in workers if w and w["running"]]
        if busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            return busy[0]
        time.sleep(poll_s)
    return None


def wait_workers_up(url: str, count: int, timeout_s: float = 90.0) -> bool:
    """True once the runtime counts ``count`` workers up again (a replaced replica rejoined)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_metric(url, "promptserve_workers_up") >= count:
            return True
        time.sleep(0.5)
    return False
