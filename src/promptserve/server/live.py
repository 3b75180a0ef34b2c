"""Run an app on a free localhost port in a background thread, or ``promptserve serve`` in a
process of its own (tests, benchmarks and the reliability suite)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(app) as url:`` serves ``app`` on 127.0.0.1 until the block ends."""

    def __init__(self, app, start_timeout_s: float = 30.0) -> None:
        from promptserve.edge.limits import HttpLimits
        from promptserve.edge.protocol import uvicorn_config

        self.port = free_port()
        limits = getattr(app.state, "http_limits", None) or HttpLimits()
        self.server = uvicorn.Server(
            uvicorn_config(app, "127.0.0.1", self.port, limits, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("server did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(  # noqa: ANN201
    args: list[str],
    cache_dir: Path,
    timeout_s: float = 120.0,
    env: dict | None = None,
    port: int | None = None,
):
    """``promptserve serve ARGS`` in its own process (its memory and CPU its own), on ``port``
    (default: a free one); the process and its URL once ``/healthz`` answers."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "promptserve.cli", "serve", "--port", str(port)]
    cmd += ["--cache-dir", str(cache_dir), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
