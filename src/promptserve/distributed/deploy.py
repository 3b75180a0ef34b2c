"""Build and run the Ray Serve application."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from ray import serve

from promptserve.distributed.ray_workers import RayWorkers
from promptserve.distributed.replica import EngineWorker
from promptserve.profile import profile_for
from promptserve.server import ServerConfig, app_for, engine_args, latents_dir

log = logging.getLogger(__name__)
APP_NAME = "promptserve"


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray; "auto" or ray://...: join a cluster
    host: str = "127.0.0.1"
    port: int = 8000
    worker_cpus: float = 1.0
    worker_gpus: float | None = None  # None: 1 when the device is CUDA, else 0
    num_cpus: int | None = None  # a local Ray's CPU count (tests use 2)

    @classmethod
    def from_settings(cls, s) -> RaySettings:
        """From validated serve settings (``promptserve.config.ServeFile``)."""
        return cls(s.ray_address, s.host, s.port, s.ray_worker_cpus, s.ray_worker_gpus)


@serve.ingress()
class Ingress:
    """The API, planner, dispatcher and cache index: one replica in front of the workers."""

    async def __init__(self, config: ServerConfig, *handles) -> None:
        infos = await asyncio.gather(*(h.describe.remote() for h in handles))
        if len({(i["name"], i["total_steps"], i["levels"]) for i in infos}) != 1:
            raise RuntimeError("the workers do not run the same model and levels")
        self.workers = RayWorkers(handles, infos[0])
        if config.profile is not None:  # plan with the measured profile, not the quick one
            w = self.workers
            w.profile = profile_for(config.profile, w.name, w.total_steps, w.levels)
        self.api = app_for(config, self.workers)

        @self.api.get("/v1/cluster")
        async def cluster():
            """Each worker replica as it answers now: index, pid, level, batches run."""
            return {"workers": await self.workers.pings()}

    def __serve_build_asgi_app__(self):
        return self.api


def deploy_app(config: ServerConfig, settings: RaySettings):
    """The bound application: ``config.workers`` worker deployments and the ingress."""
    # one absolute path for the ingress and every worker (the same mount on every node)
    config = replace(config, cache_dir=config.cache_dir.resolve())
    gpus = settings.worker_gpus
    if gpus is None:
        gpus = 1.0 if config.device.startswith("cuda") else 0.0
    worker = serve.deployment(EngineWorker)
    store_root = str(latents_dir(config.cache_dir).resolve())
    handles = [
        worker.options(
            name=f"worker-{i}",
            num_replicas=1,
            max_ongoing_requests=16,
            ray_actor_options={"num_cpus": settings.worker_cpus, "num_gpus": gpus},
        ).bind(i, *engine_args(config, config.device), store_root)
        for i in range(config.workers)
    ]
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        max_ongoing_requests=10_000,  # admission is the planner's: Serve must not shed first
        ray_actor_options={"num_cpus": 0},
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
        ray.init(
            address=settings.address,
            num_cpus=settings.num_cpus if settings.address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deploy_app(config, settings), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"
