"""A supervisor's restart after a crash: SIGKILL the server while clients hold connections,
start it again at once on the same port and cache folder, and time until it serves.

The killed server's side of each held connection lingers (FIN-WAIT-2, then TIME-WAIT) for tens
of seconds; a bind without ``SO_REUSEADDR`` is refused while it does. The restart is timed against
this machine's own cold start of the same server (a slow CI machine imports torch slowly too):
it may take that plus ``margin_s``, well under the 60 s a lingering socket holds the port.
"""

from __future__ import annotations

import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx

from promptserve.server.live import free_port
from reliability.server import start_server, stop

ARGS = ["--model", "tiny", "--embedder", "hashing", "--workers", "1", "--slo", "300"]
LINGERING = {"04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "08": "CLOSE_WAIT"}


def lingering_sockets(port: int) -> dict[str, int]:
    """Sockets on ``port`` in a closing state, by state (``/proc/net/tcp``)."""
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in LINGERING:
                name = LINGERING[fields[3]]
                counts[name] = counts.get(name, 0) + 1
    return counts


def hold_connections(port: int, idle: int, in_flight: int) -> list[socket.socket]:
    """Connections the clients keep open through the crash: some idle after an answer, some
    waiting on a generation."""
    held = []
    for i in range(idle + in_flight):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i < idle:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(4096)
        else:
            body = b'{"prompt": "a held request %d"}' % i
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
        held.append(s)
    return held


def run(idle: int = 8, in_flight: int = 4, margin_s: float = 10.0) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="restart-"))
    port = free_port()
    started = time.monotonic()
    proc, url = start_server(ARGS, cache, port=port)
    held: list[socket.socket] = []
    try:
        httpx.post(f"{url}/v1/images/generations", json={"prompt": "before"}, timeout=60)
        cold_s = time.monotonic() - started
        held = hold_connections(port, idle, in_flight)
        time.sleep(0.3)  # the in-flight requests are in the server's hands
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        lingering = lingering_sockets(port)
        error = None
        try:
            proc, url = start_server(ARGS, cache, port=port)
            up_s = time.monotonic() - killed_at
            r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "after"}, timeout=60)
            serving_s = time.monotonic() - killed_at if r.status_code == 200 else None
        except RuntimeError as exc:  # refused to start: the one-line error it printed
            error, up_s, serving_s = str(exc)[-300:], None, None
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            stop(proc)
    within_s = round(cold_s + margin_s, 2)
    return {
        "held_connections": idle + in_flight,
        "cold_start_serving_s": round(cold_s, 2),
        "lingering_at_restart": lingering,
        "restart_refused": error is not None,
        "error": error,
        "up_after_s": None if up_s is None else round(up_s, 2),
        "serving_after_s": None if serving_s is None else round(serving_s, 2),
        "serving_within_s": within_s,
        "served_in_time": serving_s is not None and serving_s <= within_s,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run()))
