"""The alternative we measured and did not choose: a Ray Serve ``RequestRouter`` that sends a
request to a replica whose reported level matches (``benchmarks/bench_ray.py``).

A replica reports its level through ``record_routing_stats``, which Serve polls on a period;
until the next poll after a re-plan the router routes by the old levels. ``LevelReplica`` is the
probe deployment the benchmark routes to.
"""

from __future__ import annotations

from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class LevelRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target = kwargs.get("replica")
        if target is not None:  # addressed to one replica (its level setting)
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        level = kwargs.get("level")
        match = [r for r in candidate_replicas if r.routing_stats.get("level") == level]
        rest = [r for r in candidate_replicas if r not in match]
        return [match, rest] if match else [rest]


class LevelReplica:
    """Answers with the level it is really at, so a benchmark can count misrouted requests."""

    def __init__(self) -> None:
        self.level: int | None = None

    def whoami(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def set_level(self, level: int, replica: str | None = None) -> None:
        self.level = level

    def run(self, level: int | None = None) -> int | None:
        return self.level

    def record_routing_stats(self) -> dict:
        return {"level": self.level}
