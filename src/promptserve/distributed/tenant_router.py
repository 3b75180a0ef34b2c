"""Several ingress replicas, each tenant on one: a Ray Serve ``RequestRouter`` on the ingress
deployment that sends a request to the replica owning its tenant's shard of the hash ring
(``policy.shards.ShardRing``).

Each ingress replica owns a slice of the worker replicas and its own cache folder, so a
tenant's whole cache partition lives on one replica and tenants never share entries. Serve's
HTTP proxy calls this router for every request. It reads the caller's ``Authorization``
header from the request's ``session_id``, which the proxy fills from the header named by
``RAY_SERVE_SESSION_ID_HEADER_KEY``: ``run_on_ray`` sets that to ``authorization`` before it
starts a local Ray. A cluster started by hand needs the same variable on every node. A
replica reports its shard in its routing stats. Until Serve has polled them (about a second
after start), a request waits in the router's backoff rather than go to a replica that does
not hold its tenant.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from promptserve.edge.keys import DEFAULT_TENANT
from promptserve.policy.shards import ShardRing

SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
SESSION_HEADER = "authorization"
STATS_PERIOD_S = 1.0  # how often Serve polls each replica's shard


def key_digest(token: str) -> str:
    """What the router holds of an API key: its SHA-256, never the key."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def tenant_of(authorization: str, tenants: dict[str, str]) -> str:
    """The tenant an ``Authorization`` header names. With no keys configured every caller is
    the default tenant; an unknown key routes as itself (its replica answers 401)."""
    if not tenants:
        return DEFAULT_TENANT
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    digest = key_digest(token)
    return tenants.get(digest, digest)


class TenantRouter(RequestRouter):
    def initialize_state(self, shards: int = 1, tenants: dict[str, str] | None = None) -> None:
        self.ring = ShardRing(shards)
        self.tenants = dict(tenants or {})  # key digest -> tenant

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            # Serve's routing tasks also ask with no request in hand, to hand whichever is
            # oldest to any replica that has room; refusing them all wedges the proxy. Such a
            # request is served where it lands: a miss of its tenant's entries, never another
            # tenant's (each replica's cache is partitioned by tenant)
            return [candidate_replicas]
        session = pending_request.metadata.session_id or ""
        shard = self.ring.shard_of(tenant_of(session, self.tenants))
        mine = [r for r in candidate_replicas if r.routing_stats.get("shard") == shard]
        # where that replica cannot take it now (or its stats are not polled yet), Serve backs
        # off before asking again, as its own router does on its last tier
        pending_request.routing_context.should_backoff = True
        return [mine]
