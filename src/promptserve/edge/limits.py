"""What a request may cost the server before it is a request: the head's size and count, the
time its head and body may take, the connections one address may hold, and the body's size.

The connection-level limits live in ``edge.protocol`` (a slow or oversized head never reaches
the app); the ones that read a parsed head or the body are the ASGI middleware here.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException as StarletteHTTPException

from promptserve.edge.keys import KeyTable, tenant_for

# paths whose caller is a tenant: everything else is operational or a capability URL
AUTHENTICATED = ("/v1/images/generations", "/v1/jobs")


@dataclass(frozen=True)
class HttpLimits:
    """Defaults sized for a JSON API whose largest request is a 1 MiB body: Node's 16 KiB head,
    Apache's 100 header fields, head and body deadlines of Go's usual 10 s and nginx's order of
    magnitude, and a per-address cap far above what one client needs (64, where one browser
    opens 6 per host)."""

    max_header_bytes: int = 16 * 1024  # the request line and every header, together
    max_headers: int = 100
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its head
    body_timeout_s: float = 30.0  # from the end of the head to the end of the body
    max_connections_per_client: int = 64  # open connections per client address
    # proxies whose X-Forwarded-* headers are believed, and which the per-address cap spares
    # (every client behind a proxy shares its address); none by default
    trusted_proxies: tuple[str, ...] = ()
    # an answer the client leaves unread this long (the send buffer full, not draining): the
    # connection is dropped, and what it held with it
    send_timeout_s: float = 30.0
    # the kernel's send buffer per connection: what a client that never reads holds there (the
    # rest waits in the server, where the send timeout sees it); 1 MiB keeps a fast link full
    send_buffer_bytes: int = 1 << 20

    def trusts(self, host: str | None) -> bool:
        """Whether ``host`` is one of the trusted proxies (addresses or networks, or ``*``)."""
        if host is None or not self.trusted_proxies:
            return False
        if "*" in self.trusted_proxies:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.trusted_proxies
        for entry in self.trusted_proxies:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def check_proxies(entries: list[str]) -> tuple[str, ...]:
    """``--trusted-proxies`` as given, each an address, a network or ``*``; a bad one is
    named."""
    from promptserve.errors import InputError

    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise InputError(
                f"trusted proxy {entry!r} is not an IP address, a network (10.0.0.0/8) or *"
            ) from None
    return tuple(entries)


def error_body(message: str, param: str | None, status: int) -> bytes:
    """The API's error shape, as bytes (the protocol and the middleware answer before FastAPI)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param}}).encode()


class BodyTooLarge(StarletteHTTPException):
    param = "body"


# the routes that take an upload (an edit's image and mask, each at most 20 MiB:
# ``server.editinput.MAX_UPLOAD_BYTES``), and their body's limit with the form's text
UPLOADS = frozenset({"/v1/images/edits", "/v1/jobs/edits"})
UPLOAD_BODY_BYTES = 41 * 1024 * 1024


class RequestGate:
    """Refuses, in this order and before any route reads the body: a head with too many or too
    large header fields (431), a protected path without a valid key (401: a caller with no key
    learns nothing of the API's fields or limits), and a body whose Content-Length is over the
    limit (413). A chunked body carries no Content-Length, so the body is also counted as it
    streams in; past the limit the read fails with 413 (FastAPI passes an HTTPException raised
    while it reads the body through unchanged)."""

    def __init__(self, app, max_body_bytes: int, keys: KeyTable, limits: HttpLimits) -> None:
        self.app, self.max_body_bytes, self.keys, self.limits = app, max_body_bytes, keys, limits

    def limit(self, scope) -> int:
        """An edit's form carries an image and a mask (``UPLOAD_BODY_BYTES``); any other
        body, the configured limit."""
        return (
            max(UPLOAD_BODY_BYTES, self.max_body_bytes)
            if scope["path"] in UPLOADS
            else self.max_body_bytes
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            status, message, param = refusal
            await answer(send, status, message, param)
            return
        seen, limit = 0, self.limit(scope)

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, counted, send)

    def refusal(self, scope) -> tuple[int, str, str] | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        limits = self.limits
        if len(headers) > limits.max_headers:
            return 431, f"more than {limits.max_headers} header fields", "headers"
        if sum(len(k) + len(v) for k, v in headers) > limits.max_header_bytes:
            return 431, f"header fields over {limits.max_header_bytes} bytes", "headers"
        values = dict(headers)
        if scope["path"].startswith(AUTHENTICATED):
            authorization = values.get(b"authorization", b"").decode("latin-1")
            if tenant_for(self.keys, authorization) is None:
                return (
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    "authorization",
                )
        length, limit = values.get(b"content-length"), self.limit(scope)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body over {limit} bytes", "body"
        return None


async def answer(send, status: int, message: str, param: str | None) -> None:
    body = error_body(message, param, status)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
