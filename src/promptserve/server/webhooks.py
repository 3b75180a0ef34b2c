"""Webhooks for jobs: a job that names a ``webhook_url`` is told how it ended, signed as
Standard Webhooks signs (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``: ``v1,``
and the base64 HMAC-SHA256 of ``id.timestamp.body`` under its tenant's secret).

The delivery is a row of the job store, written in the transaction that finishes the job
(``JobStore.finish``): a crash never loses one, and a restart sends it again under the same
``webhook-id`` (a receiver drops repeats by it). Each attempt is recorded; a failed one is
retried with a doubling backoff, up to ``ATTEMPTS``.

Only to hosts an operator allows (``serve --webhook-allow HOST|CIDR``, repeatable): a URL's
host must be a listed name or an address in a listed network, and at delivery every address a
name resolves to that is private, loopback or link-local must be in a listed network too (a
public name cannot be pointed at the server's own network). No redirect is followed; a
delivery has a timeout and its body a size cap (past it the images are left out: the
receiver reads the job).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from promptserve.errors import InputError

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # one attempt's, connect to answer
MAX_BODY_BYTES = 256 * 1024  # past it a delivery leaves the images out
ATTEMPTS = 8  # then the delivery is recorded failed
FIRST_RETRY_S, LAST_RETRY_S = 1.0, 300.0  # a doubling backoff between the two
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Allow:
    """Where webhooks may go: host names, and networks."""

    names: frozenset[str] = frozenset()
    nets: tuple[Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.names or self.nets)

    def holds(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.nets)


def parse_allow(items: Sequence[str], flag: str = "--webhook-allow") -> Allow:
    """``example.com``, ``10.0.0.0/8``, ``127.0.0.1``: a host name or a network each."""
    names, nets = set(), []
    for item in items:
        text = item.strip().lower()
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if not text or "/" in text or ":" in text or not all(p for p in text.split(".")):
            raise InputError(f"{flag} {item!r} is neither a host name nor an address or CIDR")
        names.add(text)
    return Allow(frozenset(names), tuple(nets))


def refusal(url: str, allow: Allow) -> str | None:
    """Why ``url`` may not be a webhook (None: it may)."""
    if not allow:
        return "webhooks are off on this server (serve --webhook-allow HOST|CIDR turns them on)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook_url must be an http or https URL with a host"
    if parts.username or parts.password:
        return "webhook_url must not carry credentials"
    host = parts.hostname.lower()
    try:
        if allow.holds(host):
            return None
        return f"webhook_url: {host} is in no network serve --webhook-allow lists"
    except ValueError:  # a name
        if host in allow.names:
            return None
        return f"webhook_url: {host} is not a host serve --webhook-allow lists"


def resolved_refusal(host: str, addresses: Sequence[str], allow: Allow) -> str | None:
    """At delivery: an address the host resolved to that the server's own networks hold
    (private, loopback, link-local) must be in a listed network."""
    for address in addresses:
        ip = ipaddress.ip_address(address)
        inner = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
        if inner and not allow.holds(address):
            return f"{host} resolves to {address}, a private address no listed network holds"
    return None


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of
    ``id.timestamp.body`` under the secret (a ``whsec_`` secret's key is its base64 part)."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode("utf-8")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(headers: dict[str, str], body: bytes, secret: str) -> bool:
    """What a receiver checks: the delivery's ``webhook-signature`` is the secret's over its
    id, timestamp and body (any of several space-separated signatures may match)."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        stamp = int(h["webhook-timestamp"])
        expected = signature(secret, h["webhook-id"], stamp, body)
    except (KeyError, ValueError):
        return False
    return any(hmac.compare_digest(s, expected) for s in h.get("webhook-signature", "").split())


def payload(view: dict, now: float) -> bytes:
    """The body: the job's view as an event, its images left out past ``MAX_BODY_BYTES``."""
    event = {"type": f"job.{view['status']}", "timestamp": int(now), "data": view}
    body = json.dumps(event).encode()
    if len(body) > MAX_BODY_BYTES:
        slim = {k: v for k, v in view.items() if k != "data"} | {"data_omitted": True}
        body = json.dumps(event | {"data": slim}).encode()
    return body


@dataclass
class Hooks:
    """A server's webhooks: where they may go, the keys file's secrets, and the sender."""

    allow: Allow
    secrets: dict[str, str]  # per tenant, from the keys file (else one kept in the job store)
    sender: Sender | None = None


@dataclass
class Delivery:
    msg_id: str
    job_id: str
    tenant: str
    url: str
    body: bytes
    attempts: int = 0
    next_at: float = 0.0


def backoff_s(attempts: int) -> float:
    return min(FIRST_RETRY_S * 2 ** max(attempts - 1, 0), LAST_RETRY_S)


@dataclass
class Sender:
    """Sends the store's pending deliveries, each as soon as it is due; records each attempt
    (``record(msg_id, attempts, next_at, status, error)``) before the next."""

    allow: Allow
    secret_of: Callable[[str], str]  # a tenant's signing secret
    pending: Callable[[], list[Delivery]]
    record: Callable[[str, int, float, str, str | None], None]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("delivered", "retried", "failed"), 0))  # fmt: skip
    resolve: Callable[[str], list[str]] | None = None  # a host's addresses (tests)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_count: Callable[[dict[str, int]], None] | None = None  # after each attempt (metrics)

    async def run(self, client: httpx.AsyncClient | None = None) -> None:
        own = client is None
        client = client or httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        try:
            while True:
                self.wake.clear()  # before reading: a delivery written from now on wakes it
                try:
                    due = await asyncio.to_thread(self.pending)
                    now = time.time()
                    for delivery in [d for d in due if d.next_at <= now]:
                        await self.attempt(client, delivery)
                except Exception:  # the store or a write failed: logged, tried again later
                    log.exception("webhook deliveries failed; trying again in a minute")
                    due, now = [], time.time()
                later = [d.next_at for d in due if d.next_at > now]
                wait = min(later, default=now + 60.0) - time.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(wait, 0.05))
        finally:
            if own:
                await client.aclose()

    async def attempt(self, client: httpx.AsyncClient, d: Delivery) -> None:
        d.attempts += 1
        error = await self.send(client, d)
        if error is None:
            self.counts["delivered"] += 1
            status, next_at = "delivered", 0.0
        elif d.attempts >= ATTEMPTS:
            self.counts["failed"] += 1
            status, next_at = "failed", 0.0
            log.warning("webhook %s for job %s failed for good: %s", d.msg_id, d.job_id, error)
        else:
            self.counts["retried"] += 1
            status, next_at = "pending", time.time() + backoff_s(d.attempts)
        await asyncio.to_thread(self.record, d.msg_id, d.attempts, next_at, status, error)
        if self.on_count is not None:
            self.on_count(self.counts)

    async def send(self, client: httpx.AsyncClient, d: Delivery) -> str | None:
        """One attempt; why it failed (None: a 2xx answer)."""
        why = refusal(d.url, self.allow)
        host = (urlsplit(d.url).hostname or "").lower()
        if why is None and host in self.allow.names:  # a name: where it points now
            try:
                addresses = await asyncio.to_thread(self.resolve or _addresses, host)
            except OSError as exc:
                return f"{host} does not resolve: {exc}"
            why = resolved_refusal(host, addresses, self.allow)
        if why is not None:
            return why
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": d.msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature(self.secret_of(d.tenant), d.msg_id, stamp, d.body),
        }
        try:
            answer = await client.post(d.url, content=d.body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"


def _addresses(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
