"""Clients that ask and never read: each answer is larger than the kernel may hold for its
connection, and after the send timeout the server drops the connection and what it held."""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import time
from pathlib import Path

import httpx

from promptserve.edge.limits import HttpLimits
from promptserve.loadgen import read_metric
from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer

SEND_TIMEOUT_S = 2.0


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def answered(url: str) -> float:
    """Images answered so far (on time or late)."""
    return sum(
        read_metric(url, "promptserve_requests_total", {"outcome": o}) for o in ("served", "late")
    )


def never_reading(clients: int = 8) -> dict:
    limits = HttpLimits(send_timeout_s=SEND_TIMEOUT_S, send_buffer_bytes=16 * 1024)
    cfg = ServerConfig(
        model="tiny", embedder="hashing", cache_dir=Path(tempfile.mkdtemp()), slo_s=300,
        http=limits,
    )  # fmt: skip
    app = build_app(cfg)
    body = json.dumps({"prompt": "a kite", "n": 10, "size": "96x64"}).encode()
    wire = (
        b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with LiveServer(app) as url:
        port = int(url.rsplit(":", 1)[1])
        rss_before = _rss_mb()
        held = []
        for _ in range(clients):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.sendall(wire)
            held.append(s)
        served_meanwhile = httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        deadline = time.monotonic() + 300
        while answered(url) < 10 * clients and time.monotonic() < deadline:
            time.sleep(0.1)  # the images are made; their answers go out, unread
        sent_at = time.monotonic()
        time.sleep(SEND_TIMEOUT_S + 3.0)
        cut = 0
        for s in held:
            got = bytearray()
            s.settimeout(10.0)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while chunk := s.recv(65536):
                    got.extend(chunk)
            s.close()
            head, _, rest = bytes(got).partition(b"\r\n\r\n")
            length = next(
                (
                    int(ln.split(b":")[1])
                    for ln in head.lower().split(b"\r\n")
                    if ln.startswith(b"content-length")
                ),
                None,
            )
            cut += length is None or len(rest) < length
        rss_after = _rss_mb()
    return {
        "clients": clients,
        "send_timeout_s": SEND_TIMEOUT_S,
        "dropped": cut,
        "seconds_waited_after_answers": round(time.monotonic() - sent_at, 1),
        "served_others_meanwhile": served_meanwhile,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
    }


def run() -> dict:
    return {"never_reading": never_reading()}
