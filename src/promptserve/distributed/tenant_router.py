"""Several ingress replicas, each tenant on one: a Ray Serve ``RequestRouter`` on the ingress
deployment that sends a request to the replica owning its tenant's shard of the hash ring
(``policy.shards.ShardRing``).

Each ingress replica owns a slice of the worker replicas and its own cache folder, so a
tenant's whole cache partition lives on one replica and tenants never share entries. Serve's
HTTP proxy calls this router for every request. It reads the caller's ``Authorization``
header from the request's ``session_id``, which the proxy fills from the header named by
``RAY_SERVE_SESSION_ID_HEADER_KEY``: ``run_on_ray`` sets that to ``authorization`` before it
starts a local Ray. A cluster started by hand needs the same variable on every node; where
the proxy reads another header the router trusts no session id at all (a client's own
``x-session-id`` would pick the replica), and every ingress replica refuses a tenant that is
not its own (421), so a misconfigured cluster is loud, never a cache shared across shards.

A request whose session is no key (image links, ``/metrics``, a key the router does not know)
is spread over the replicas by its request id; a replica that is asked for an image another
holds fetches it from that one (``promptserve-shard N`` sessions, which only route).

A replica reports its shard in its routing stats. Until Serve has polled them (about a second
after start) a request waits in the router's backoff rather than go to a replica that does
not hold its tenant.

Routing loop. Serve's base loop pops a pending request, then may leave it (a routing task
over the target count breaks out) in no queue at all: under sustained load such requests are
never answered, and a task with nothing to route spins asking for replicas. Here a task that
popped a request keeps it until a replica takes it or its caller gives up, and a task with
nothing to route ends (new requests start new tasks), as Ray's own consistent-hash router
does for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from promptserve.edge.keys import DEFAULT_TENANT, key_digest
from promptserve.policy.shards import ShardRing

log = logging.getLogger(__name__)

SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
SESSION_HEADER = "authorization"
STATS_PERIOD_S = 1.0  # how often Serve polls each replica's shard
PEER = "promptserve-shard "  # an ingress replica asking a peer: "promptserve-shard N"
WARN_EVERY = 50  # tries between two warnings about one request that finds no replica


def tenant_of(authorization: str, tenants: dict[str, str]) -> str | None:
    """The tenant an ``Authorization`` header names, or None where it names none this router
    knows (no key, an unknown key: it is spread, and its replica answers 401). With no keys
    configured every caller is the default tenant."""
    if not tenants:
        return DEFAULT_TENANT
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return tenants.get(key_digest(token))


def session_header_trusted(header: str) -> bool:
    """Whether the proxy fills session ids from ``Authorization``: otherwise they are whatever a
    client put in its own session header, and route nothing."""
    return header.lower().replace("_", "-") == SESSION_HEADER


def shard_for(session: str, request_id: str, ring: ShardRing, tenants: dict[str, str]) -> int:
    """The shard a request goes to: a peer's by name, a known tenant's by the ring, any other
    spread by its request id."""
    if session.startswith(PEER) and session[len(PEER) :].isdigit():
        return int(session[len(PEER) :]) % ring.n_shards
    tenant = tenant_of(session, tenants)
    return ring.spread(request_id) if tenant is None else ring.shard_of(tenant)


class TenantRouter(RequestRouter):
    def initialize_state(self, shards: int = 1, tenants: dict[str, str] | None = None) -> None:
        from ray.serve._private.constants import SERVE_SESSION_ID

        self.ring = ShardRing(shards)
        self.tenants = dict(tenants or {})  # key digest -> tenant
        self.trusted = session_header_trusted(SERVE_SESSION_ID)
        if not self.trusted and shards > 1:
            log.error(
                "the proxy reads session ids from %r, not Authorization: requests are spread "
                "and replicas refuse other shards' tenants (set %s=%s on every node)",
                SERVE_SESSION_ID,
                SESSION_HEADER_ENV,
                SESSION_HEADER,
            )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:  # the loop below never asks without a request
            return [candidate_replicas]
        meta = pending_request.metadata
        session = (meta.session_id or "") if self.trusted else ""
        shard = shard_for(session, meta.internal_request_id, self.ring, self.tenants)
        mine = [r for r in candidate_replicas if r.routing_stats.get("shard") == shard]
        # where that replica cannot take it now (or its stats are not polled yet), Serve backs
        # off before asking again, as its own router does on its last tier
        pending_request.routing_context.should_backoff = True
        return [mine]

    def _drop_done_fronts(self) -> None:
        fulfil = self._pending_requests_to_fulfill
        while fulfil and fulfil[0].future.done():
            fulfil.popleft()

    async def _route_one(self, pending: PendingRequest) -> None:
        """Try until a replica takes ``pending`` or its caller is gone."""
        tries, start = 0, time.monotonic()
        choices = self._choose_replicas_with_backoff(pending)
        try:
            async for candidates in choices:
                self._drop_done_fronts()
                if pending.future.done():
                    return
                replica = await self._select_from_candidate_replicas(candidates, tries)
                if replica is not None:
                    self._fulfill_next_pending_request(replica, pending.metadata)
                    return
                tries += 1
                if tries % WARN_EVERY == 0:
                    log.warning(
                        "request %s found no replica of its shard in %d tries over %.1f s",
                        pending.metadata.request_id,
                        tries,
                        time.monotonic() - start,
                    )
        finally:
            await choices.aclose()

    async def _fulfill_pending_requests(self) -> None:
        try:
            while len(self._routing_tasks) <= self.target_num_routing_tasks:
                pending = self._get_next_pending_request_to_route()
                if pending is None:
                    self._drop_done_fronts()
                    return
                await self._route_one(pending)
        except Exception:
            log.exception("the tenant router's routing task failed")
        finally:
            self._routing_tasks.discard(asyncio.current_task(loop=self._event_loop))
            self.num_routing_tasks_gauge.set(self.curr_num_routing_tasks)
