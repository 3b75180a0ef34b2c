"""Build and run the Ray Serve application."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from promptserve.distributed.ray_workers import RayWorkers
from promptserve.distributed.replica import EngineWorker
from promptserve.distributed.tenant_router import (
    PEER,
    SESSION_HEADER,
    SESSION_HEADER_ENV,
    STATS_PERIOD_S,
    TenantRouter,
)
from promptserve.edge.keys import KeyTable
from promptserve.edge.limits import answer
from promptserve.errors import InputError
from promptserve.policy.shards import ShardRing
from promptserve.profile import profile_for
from promptserve.server import ServerConfig, app_for, engine_args, latents_dir
from promptserve.server.schemas import MAX_DEADLINE_MS

log = logging.getLogger(__name__)
APP_NAME = "promptserve"
REQUEST_TIMEOUT_S = MAX_DEADLINE_MS / 1000 + 60.0


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray; "auto" or ray://...: join a cluster
    host: str = "127.0.0.1"
    port: int = 8000
    worker_cpus: float = 1.0
    worker_gpus: float | None = None  # None: 1 when the device is CUDA, else 0
    num_cpus: int | None = None  # a local Ray's CPU count (tests use 2)
    ingress_replicas: int = 1  # each owns a slice of the workers and its tenants' caches
    # the proxy ends any request after this (the longest deadline a request may ask, and a
    # minute): nothing is held forever, whatever goes wrong behind it
    request_timeout_s: float = REQUEST_TIMEOUT_S

    @classmethod
    def from_settings(cls, s) -> RaySettings:
        """From validated serve settings (``promptserve.config.ServeFile``)."""
        return cls(
            s.ray_address,
            s.host,
            s.port,
            s.ray_worker_cpus,
            s.ray_worker_gpus,
            ingress_replicas=s.ray_ingress_replicas,
        )


def shard_dir(cache_dir: Path, shard: int, shards: int) -> Path:
    """Ingress replica ``shard``'s cache folder: its own manifest, latents and embeddings
    (one replica: the folder itself, as without Ray)."""
    return cache_dir if shards == 1 else cache_dir / f"ingress-{shard}"


class OwnTenantsOnly:
    """A caller whose tenant another ingress replica owns is refused (421), never served here:
    its cache partition is there. It happens only where the proxy does not route by the key
    (``RAY_SERVE_SESSION_ID_HEADER_KEY`` unset on a node), which the answer names. Plain ASGI,
    so streams and a client's disconnect pass through untouched."""

    def __init__(self, app, keys: KeyTable, ring: ShardRing, shard: int) -> None:  # noqa: ANN001
        self.app, self.keys, self.ring, self.shard = app, keys, ring, shard

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            tenant = self.keys.tenant(auth or None)
            if tenant is not None and self.ring.shard_of(tenant) != self.shard:
                message = (
                    "this ingress replica does not hold your tenant: the cluster's proxies must "
                    f"route by API key ({SESSION_HEADER_ENV}={SESSION_HEADER} on every node)"
                )
                await answer(send, 421, message, "authorization")
                return
        await self.app(scope, receive, send)


@serve.ingress()
class Ingress:
    """The API, planner, dispatcher and cache index in front of the workers. With several
    replicas, replica r (its Serve rank) owns workers r, r + n, r + 2n, ... and the tenants
    the ring gives shard r (``tenant_router.TenantRouter`` sends them here)."""

    async def __init__(self, config: ServerConfig, *handles) -> None:
        context = serve.get_replica_context()
        self.shard, self.shards = context.rank.rank, context.world_size
        handles = handles[self.shard :: self.shards]
        jobs_dir = shard_dir(config.jobs_dir or config.cache_dir, self.shard, self.shards)
        config = replace(
            config, cache_dir=shard_dir(config.cache_dir, self.shard, self.shards),
            jobs_dir=jobs_dir,
        )  # fmt: skip
        infos = await asyncio.gather(*(h.describe.remote() for h in handles))
        if len({(i["name"], i["total_steps"], i["levels"]) for i in infos}) != 1:
            raise RuntimeError("the workers do not run the same model and levels")
        self.workers = RayWorkers(handles, infos[0])
        if config.profile is not None:  # plan with the measured profile, not the quick one
            w = self.workers
            w.profile = profile_for(config.profile, w.name, w.total_steps, w.levels)
        # each ingress replica its own job store (its tenants' jobs: a tenant always reaches
        # the replica whose shard holds it), restored by the replica Ray starts in its place
        self.api = app_for(config, self.workers)
        if self.shards > 1:
            self._share_images()
            self._own_tenants_only(KeyTable(config.api_keys))

        @self.api.get("/v1/cluster")
        async def cluster():
            """Each worker replica of this ingress as it answers now: index, pid, level,
            batches run; and which ingress replica answered."""
            ingress = {"shard": self.shard, "of": self.shards, "pid": os.getpid()}
            return {"workers": await self.workers.pings(), "ingress": ingress}

    def __serve_build_asgi_app__(self):
        return self.api

    def _share_images(self) -> None:
        """Image ids start with this replica's shard; one asked for another's image fetches it
        from that replica (keyless links are spread over the replicas by the router)."""
        ctx = self.api.state.context
        ctx.images.prefix = f"{self.shard:02x}"
        me = serve.get_replica_context().deployment

        async def peer_image(image_id: str) -> tuple[bytes, str] | None:
            shard = int(image_id[:2], 16)
            if shard == self.shard or shard >= self.shards:
                return None
            peers = serve.get_deployment_handle(me, APP_NAME)
            call = peers.options(session_id=f"{PEER}{shard}", method_name="image_bytes")
            return await call.remote(image_id)

        ctx.peer_image = peer_image

    def image_bytes(self, image_id: str) -> tuple[bytes, str] | None:
        """An image this replica holds, for a peer asked for it."""
        return self.api.state.context.images.get(image_id, time.monotonic())

    def _own_tenants_only(self, keys: KeyTable) -> None:
        self.api.add_middleware(
            OwnTenantsOnly, keys=keys, ring=ShardRing(self.shards), shard=self.shard
        )

    def record_routing_stats(self) -> dict:
        """What ``TenantRouter`` routes by."""
        return {"shard": self.shard}


def deploy_app(config: ServerConfig, settings: RaySettings):
    """The bound application: ``config.workers`` worker deployments and the ingress
    (``settings.ingress_replicas`` replicas, tenants routed to theirs by ``TenantRouter``)."""
    shards = settings.ingress_replicas
    if shards < 1 or config.workers < shards:
        raise InputError(
            f"--ingress-replicas {shards}: each ingress replica needs a worker of its own "
            f"(--workers {config.workers})"
        )
    # one absolute path for the ingress and every worker (the same mount on every node)
    config = replace(config, cache_dir=config.cache_dir.resolve())
    gpus = settings.worker_gpus
    if gpus is None:
        gpus = 1.0 if config.device.startswith("cuda") else 0.0
    worker = serve.deployment(EngineWorker)
    handles = [
        worker.options(
            name=f"worker-{i}",
            num_replicas=1,
            max_ongoing_requests=16,
            ray_actor_options={"num_cpus": settings.worker_cpus, "num_gpus": gpus},
        ).bind(
            i // shards,  # its index among its ingress replica's workers
            *engine_args(config, config.device),
            str(latents_dir(shard_dir(config.cache_dir, i % shards, shards))),
        )
        for i in range(config.workers)
    ]
    name, options = "ingress", {}
    if shards > 1:
        # Serve's proxy keeps a deployment's router, with its arguments, across a redeploy of
        # the app: the ingress is named for its ring and keys, so a new ring gets its own
        tenants = KeyTable(config.api_keys).digests
        ring = json.dumps([shards, sorted(tenants.items())]).encode()
        name = f"ingress-{hashlib.sha256(ring).hexdigest()[:12]}"
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=TenantRouter,
            request_router_kwargs={"shards": shards, "tenants": tenants},
            request_routing_stats_period_s=STATS_PERIOD_S,
        )
    ingress = serve.deployment(Ingress).options(
        name=name,
        num_replicas=shards,
        max_ongoing_requests=10_000,  # admission is the planner's: Serve must not shed first
        ray_actor_options={"num_cpus": 0},
        **options,
    )
    return ingress.bind(config, *handles)


def app_builder(args: dict[str, str]):
    """For Serve's own tooling (``serve run``, a Serve config file, KubeRay's RayService):
    ``import_path: promptserve.distributed.deploy:app_builder`` with the ``serve`` settings as
    arguments (``model``, ``workers``, ``ray_worker_gpus``, ...), validated like the config
    file."""
    from promptserve.config import server_config, validate_settings

    s = validate_settings(args, "application arguments")
    return deploy_app(server_config(s), RaySettings.from_settings(s))


def run_on_ray(config: ServerConfig, settings: RaySettings) -> str:
    """Start (or join) Ray, deploy, and return the HTTP address; Serve keeps running."""
    import ray

    if not ray.is_initialized():
        # the proxy reads each caller's key into the request's session id (the tenant router's
        # input); a local Ray's processes inherit this environment
        os.environ.setdefault(SESSION_HEADER_ENV, SESSION_HEADER)
        ray.init(
            address=settings.address,
            num_cpus=settings.num_cpus if settings.address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    serve.start(
        http_options={
            "host": settings.host,
            "port": settings.port,
            "request_timeout_s": settings.request_timeout_s,
        }
    )
    serve.run(deploy_app(config, settings), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"
