"""A closed-loop load generator cheap enough to measure the server and not itself: each client
holds one keep-alive HTTP/1.1 connection and sends the next request when the last answer is in,
written and read on raw asyncio streams (no client library, ~0.05 ms of CPU a request where
httpx takes ~0.5 ms). Run in its own process (``python -m promptserve.loadgen.closedloop``) so
that it shares no interpreter lock with the server under test; it prints one JSON line.

Only what a benchmark of ``POST /v1/images/generations`` needs: a JSON body, a
``content-length`` answer (no chunked encoding), one request in flight per connection."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

PATH = "/v1/images/generations"


@dataclass
class LoadResult:
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # the answer's own promptserve.queue_ms
    errors: dict[int, int] = field(default_factory=dict)  # status -> count (0: a broken socket)
    unanswered: int = 0  # requests with no answer within the timeout (their connection closed)

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.seconds


def request_bytes(host: str, body: bytes | None, api_key: str | None, path: str = PATH) -> bytes:
    """A POST of ``body`` to ``path``, or a GET of ``path`` where ``body`` is None."""
    auth = f"authorization: Bearer {api_key}\r\n" if api_key else ""
    if body is None:
        return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"{auth}content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def closed_loop(
    url: str,
    clients: int,
    seconds: float,
    deadline_ms: int = 60000,
    api_key: str | None = None,
    get: str | None = None,
    timeout_s: float = 120.0,
) -> LoadResult:
    """``clients`` connections, each posting distinct prompts back to back for ``seconds``;
    with ``get``, GETs of that path instead (the HTTP stack's own floor, e.g. ``/healthz``).
    A request with no answer in ``timeout_s`` counts as unanswered."""
    parts = urlsplit(url)
    out = LoadResult(seconds=seconds)
    stop = time.monotonic() + seconds

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        i = 0
        try:
            while time.monotonic() < stop:
                if get is None:
                    body = json.dumps({"prompt": f"prompt {n} {i}", "deadline_ms": deadline_ms})
                    wire = request_bytes(parts.netloc, body.encode(), api_key)
                else:
                    wire = request_bytes(parts.netloc, None, api_key, get)
                t0 = time.perf_counter()
                writer.write(wire)
                try:
                    status, data = await asyncio.wait_for(read_answer(reader), timeout_s)
                except TimeoutError:
                    out.unanswered += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    continue
                except (asyncio.IncompleteReadError, ConnectionError):
                    out.errors[0] = out.errors.get(0, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    continue
                if status == 200:
                    out.latencies_s.append(time.perf_counter() - t0)
                    if get is None:
                        out.queue_ms.append(json.loads(data)["data"][0]["promptserve"]["queue_ms"])
                else:
                    out.errors[status] = out.errors.get(status, 0) + 1
                i += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16, help="concurrent connections (16)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to send (20)")
    p.add_argument("--deadline-ms", type=int, default=60000, help="each request's deadline")
    p.add_argument("--api-key", default=None, help="a bearer key, where the server wants one")
    p.add_argument("--get", default=None, help="GET this path instead (e.g. /healthz)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="unanswered after this (120)")
    a = p.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0:
        p.error("--clients must be >= 1 and --seconds > 0")
    result = asyncio.run(
        closed_loop(a.url, a.clients, a.seconds, a.deadline_ms, a.api_key, a.get, a.timeout_s)
    )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
