"""The HTTP connection under the app: uvicorn's h11 protocol with the limits a connection needs
before it carries a request (``HttpLimits``), and the uvicorn config that serves with it.

uvicorn bounds neither how long a head may take to arrive (a slowloris client holds a
connection open forever by sending a byte now and then) nor how many connections one address
holds, and its httptools parser takes a head of any size. These are enforced here, where a head
that never completes can be seen; every refusal is one short HTTP answer, then the close. Nor
does it bound how long an answer may sit unread: a client that never reads holds its answer
(and its connection) forever. Here the kernel holds at most ``send_buffer_bytes`` of it, and a
connection whose writes stay paused for ``send_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from promptserve.edge.limits import HttpLimits, error_body

HEAD_END = b"\r\n\r\n"
LINGER_S = 2.0  # after a refusal, what the client still sends is read and dropped this long


class ConnectionCounts:
    """Open connections per client address, shared by every connection of one server."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    def admit(self, host: str, cap: int) -> bool:
        if self.open[host] >= cap:
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]


def refusal_bytes(status: int, message: str, param: str | None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written below h11 (no request may
    have been parsed yet)."""
    body = error_body(message, param, status)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        + ("retry-after: 1\r\n" if status == 429 else "")
        + "connection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """An h11 protocol class for one server: its connections share one count per address."""
    counts = ConnectionCounts()

    class GuardedH11Protocol(H11Protocol):
        _host: str | None = None  # the address counted against its cap (None: not counted)
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None  # "head" or "body" while a deadline runs on the request
        _head_bytes = 0
        _refused = False  # answered and half-closed: the rest of what arrives is dropped

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer_bytes)
            host = self.client[0] if self.client else None
            if host is not None and not limits.trusts(host):
                if not counts.admit(host, limits.max_connections_per_client):
                    cap = limits.max_connections_per_client
                    self._refuse(429, f"more than {cap} open connections from {host}", None)
                    return
                self._host = host
            self._arm("head")  # a connection that sends nothing is a head that never comes

        _send_timer: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            """The client reads slower than we write: if it reads nothing more for the send
            timeout, the connection is dropped with the answer it holds."""
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(limits.send_timeout_s, self._unread)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _unread(self) -> None:
            self._send_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app writes nothing more
                self.cycle.message_event.set()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset: the kernel drops what it still holds for the client
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()  # a close would wait for the buffer to drain: never

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            if self._host is not None:
                counts.release(self._host)
                self._host = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self.conn.their_state is h11.IDLE:  # a request's head is arriving
                if self._phase is None:
                    self._arm("head")
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes and self._head_too_large(data):
                    self._refuse(
                        431, f"request head over {limits.max_header_bytes} bytes", "headers"
                    )
                    return
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.IDLE:
                return
            self._head_bytes = 0
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body")
            else:  # the whole request is in: the app's time is the deadline's business
                self._disarm()

        def _head_too_large(self, data: bytes) -> bool:
            """Whether the bytes not yet parsed hold no head's end within the limit."""
            pending = self.conn.trailing_data[0] + data
            return HEAD_END not in pending[: limits.max_header_bytes + len(HEAD_END)]

        def _arm(self, phase: str) -> None:
            self._disarm()
            seconds = limits.header_timeout_s if phase == "head" else limits.body_timeout_s
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._timed_out, phase)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _timed_out(self, phase: str) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            idle = self.cycle is None or self.cycle.response_complete
            if phase == "head" and not self._head_bytes and idle:
                self.transport.close()  # nothing of a request arrived: closed, no answer
                return
            seconds = limits.header_timeout_s if phase == "head" else limits.body_timeout_s
            self._refuse(408, f"the request's {phase} did not arrive within {seconds:g} s", phase)

        def _refuse(self, status: int, message: str, param: str | None) -> None:
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app, if it started, writes nothing more
                self.cycle.message_event.set()
            self._disarm()
            self._refused = True
            self.transport.write(refusal_bytes(status, message, param))
            # a lingering close: closing with unread bytes would reset the connection and the
            # client might never read the answer, so half-close and drop what still comes
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, host: str, port: int, limits: HttpLimits, **kwargs) -> uvicorn.Config:  # noqa: ANN001
    """How every promptserve server is served (``serve`` and the tests' ``LiveServer``):
    the guarded protocol, and forwarded headers believed only from the trusted proxies."""
    trusted = ",".join(limits.trusted_proxies)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        h11_max_incomplete_event_size=limits.max_header_bytes + 1024,  # ours answers first
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        **kwargs,
    )
