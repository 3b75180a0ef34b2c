"""The server's wiring: from its configuration to engines, workers, cache, policy, runtime and app."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from promptserve.cache.approx import ApproxCache
from promptserve.cache.embed import make_embedder
from promptserve.cache.thresholds import embedder_thresholds
from promptserve.cachedstep import REFERENCE_CACHED_STEP_SHARE
from promptserve.edge.limits import HttpLimits
from promptserve.engine import make_engine
from promptserve.engine.adapterbank import residency
from promptserve.engine.options import EngineOptions
from promptserve.engine.profiling import cached_step_share, quick_profile
from promptserve.engine.threads import torch_threads_for
from promptserve.errors import InputError
from promptserve.policy import Setting, get_policy
from promptserve.profile import for_adapters, profile_for, with_feature_cache
from promptserve.quality import interval_quality, model_for_levels
from promptserve.server.app import create_app
from promptserve.server.clock import Pause, wall_pause
from promptserve.server.jobs import JOB_BOUNDS
from promptserve.server.jobstore import JobStore
from promptserve.server.kept import Bounds
from promptserve.server.runtime import LiveRuntime
from promptserve.server.webhooks import Allow
from promptserve.workers.base import Workers
from promptserve.workers.local import LocalWorkers, compute_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model: str = "tiny"
    backend: str | None = None
    workers: int = 1
    cache_dir: Path = Path(".promptserve")
    slo_s: float | None = None  # default: 5x the full-quality latency, at least 30 s on a CPU
    policy: str = "promptserve-step"  # "promptserve": GPUs pinned to levels, as published
    embedder: str = "minilm"
    device: str = "cpu"
    # key -> tenant; None or empty: one tenant, localhost only
    api_keys: dict[str, str] | None = None
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    speedup: float = 1.0  # modelled backend only: run this many times faster than the profile
    expected_qpm: float = 1.0  # the first plan's load, before any arrival is seen
    dtype: str = "auto"  # the engine's weights (diffusers backend); auto: by device
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    cache_max_bytes: int | None = None  # the latent files' quota; None: 10% of the free disk
    embed_cache_max_rows: int | None = 1_000_000
    public_url: str | None = None  # image links start here; None: relative to the API root
    model_names: tuple[str, ...] = ()  # the served id, then aliases; (): the model's own name
    profile: Path | None = None  # a measured profile to plan with; None: one timed run
    http: HttpLimits = field(default_factory=HttpLimits)  # the connection's limits
    sizes: tuple[tuple[int, int], ...] | None = None  # (width, height) served; None: the family's
    lora_dir: Path | None = None  # the LoRA adapters it serves (``engine.lora``)
    lora_resident: int = 8  # adapters on each worker's device at once (the rest in host memory)
    lora_resident_bytes: int | None = None  # and at most this many bytes of their rows
    lora_private: bool = False  # every join loads its adapters, resident or not
    # feature caching chosen per request with K (step-level policies, engines that have it)
    feature_cache: bool = True
    r_max: int = 4  # the longest interval offered
    # the most megapixels in flight on one GPU (step-level: a join past it waits); None: none
    max_inflight_megapixels: float | None = None
    select_cpu: float = 0.10  # ``+select``: the share of one core its replays may take
    steps: int | None = None  # denoising steps (None: the family's default; levels follow)
    # approximate caching: a request resumes at K from a neighbour's latent and leaves its own
    # (off: every request runs every step, nothing is embedded, looked up or written)
    latent_cache: bool = True
    # the durable job store's folder (None: the cache folder); its file is jobs.sqlite
    jobs_dir: Path | None = None
    webhook_allow: Allow = Allow()  # where jobs' webhooks may go (none: webhooks off)
    webhook_secrets: dict[str, str] | None = None  # per tenant, from the keys file
    jobs_in_flight: int = 1000  # per tenant, queued or running
    jobs_kept: Bounds = JOB_BOUNDS  # finished jobs per tenant: count, bytes, age


def build_app(config: ServerConfig) -> FastAPI:
    """The single-process server: ``config.workers`` logical GPUs, one engine each."""
    workers = local_workers(config)
    return app_for(config, workers)


def local_workers(config: ServerConfig) -> LocalWorkers:
    """One engine per worker, each on its own device: an engine's scheduler is not shared
    between threads, and the planner counts each worker's capacity once. CUDA workers take
    ``cuda:0 .. cuda:N-1``; N workers on one named GPU are refused. On the CPU (demos, tests)
    the N engines share its cores, which the quick profile does not see: the planner then
    over-rates the server, so say so. Each engine is built, profiled and run on its own thread
    (``engine.threads``), so the profile is measured as the engine will serve."""
    devices = worker_devices(config.device, config.workers)
    threads = compute_threads(len(devices), torch_threads_for(len(devices)))
    first = threads[0].call(make_engine, *engine_args(config, devices[0]))
    if config.profile is not None:
        profile = profile_for(config.profile, first.name, first.total_steps, first.levels)
        profile = for_adapters(profile, *residency(first))  # the engine's, not the file's
        if first.caps.feature_cache and not profile.cached_step_share:
            share = (  # measured here, as a quick profile is; the modelled SDXL's is the reference
                REFERENCE_CACHED_STEP_SHARE
                if first.caps.modelled
                else threads[0].call(cached_step_share, first)
            )
            profile = dataclasses.replace(profile, cached_step_share=share)
    else:
        profile = threads[0].call(quick_profile, first)
    if first.caps.stateless:
        return LocalWorkers([first] * config.workers, profile, threads)
    if config.workers > 1 and not devices[0].startswith("cuda"):
        log.warning(
            "%d workers share one %s device: the planner counts each at full speed",
            config.workers,
            devices[0],
        )
    rest = [
        t.call(make_engine, *engine_args(config, d))
        for t, d in zip(threads[1:], devices[1:], strict=True)
    ]
    return LocalWorkers([first, *rest], profile, threads)


def engine_args(config: ServerConfig, device: str) -> tuple:
    """``make_engine``'s arguments for one worker's device."""
    return (
        config.model, config.backend, device, config.dtype, config.speedup,
        config.engine_options, config.sizes,
        str(config.lora_dir) if config.lora_dir else None, config.lora_resident,
        config.lora_resident_bytes, config.lora_private, config.steps,
    )  # fmt: skip


def worker_devices(device: str, workers: int) -> list[str]:
    if workers == 1 or not device.startswith("cuda"):
        return [device] * workers
    if device != "cuda":
        raise InputError(
            f"--workers {workers} on one device ({device}) would count it {workers} times: "
            "use --device cuda to give each worker its own GPU"
        )
    import torch

    visible = torch.cuda.device_count()
    if visible < workers:
        raise InputError(
            f"--workers {workers} needs {workers} CUDA devices, {visible} visible "
            "(one engine per device)"
        )
    return [f"cuda:{i}" for i in range(workers)]


def app_for(config: ServerConfig, workers: Workers) -> FastAPI:
    """The API over any workers (in-process or Ray replicas): cache, planner, runtime, and
    the job store in ``jobs_dir``."""
    runtime = runtime_for(config, workers)
    jobs = JobStore(Path(config.jobs_dir or config.cache_dir) / "jobs.sqlite")
    return create_app(
        runtime,
        runtime.setting.slo_s,
        config.api_keys,
        config.max_body_bytes,
        config.public_url,
        config.http,
        config.model_names or (served_name(workers.name),),
        jobs,
        (config.webhook_allow, config.webhook_secrets or {}),
        (config.jobs_in_flight, config.jobs_kept),
    )


def served_name(engine_name: str) -> str:
    """The id a client sees by default: a weights folder's name, never its path on this
    machine (``diffusers:/models/sdxl`` is ``sdxl``)."""
    where = engine_name.partition(":")[2]
    return Path(where).name if "/" in where or "\\" in where else engine_name


def runtime_for(
    config: ServerConfig,
    workers: Workers,
    clock: Callable[[], float] = time.monotonic,
    pause: Pause = wall_pause,
) -> LiveRuntime:
    """The runtime over ``workers``: its cache, embedder, policy and setting as configured;
    ``clock`` and ``pause`` as the runtime's (a test passes a clock of its own)."""
    profile = workers.profile
    if config.max_inflight_megapixels:  # in images of the model's own size, as sizes weigh
        native = workers.native[0] * workers.native[1] / 1e6
        weight = config.max_inflight_megapixels / native
        profile = dataclasses.replace(profile, max_inflight_weight=weight)
    slo_s = config.slo_s or max(5.0 * profile.batch_latency(0, 1), 30.0)
    qm = model_for_levels(profile.levels, profile.quality)
    policy = get_policy(config.policy)
    interval_q: tuple[float, ...] = (100.0,)
    if config.feature_cache and policy.step and profile.cached_step_share > 0:
        profile = with_feature_cache(profile, profile.cached_step_share, config.r_max)
        iq = interval_quality(qm.shape)  # type: ignore[arg-type]
        interval_q = tuple(iq.q_r(r) for r in range(1, config.r_max + 1))
        log.info(
            "feature caching: intervals 1-%d, a cached step at %.2f of a full one",
            config.r_max,
            profile.cached_step_share,
        )
    embedder = make_embedder(config.embedder, config.cache_dir, config.embed_cache_max_rows)
    table = embedder_thresholds(config.embedder)
    root = cache_root(config.cache_dir)
    quota = cache_quota(config.cache_max_bytes, root)
    cache = ApproxCache(
        root, embedder.dim, table, quota_bytes=quota, total_steps=workers.total_steps
    )
    setting = Setting(tuple(profile for _ in range(workers.count)), qm.matrix(), slo_s, interval_q)
    return LiveRuntime(
        workers, cache, embedder, policy, setting, qm, clock=clock,
        expected_qpm=config.expected_qpm, pause=pause, select_cpu=config.select_cpu,
        latent_cache=config.latent_cache,
    )  # fmt: skip


def cache_quota(max_bytes: int | None, root: Path, share: float = 0.1) -> int:
    """The latent files' byte quota: as configured, else ``share`` of the disk's free space at
    start (logged, so an operator sees what was chosen)."""
    import shutil

    from pydantic import ByteSize

    def human_bytes(n: int) -> str:
        return ByteSize(n).human_readable()

    if max_bytes is not None:
        log.info("latent cache quota: %s", human_bytes(max_bytes))
        return max_bytes
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    quota = max(int(free * share), 1 << 20)
    log.warning(
        "latent cache quota: %s (%d%% of the %s free at start; set --cache-max-bytes)",
        human_bytes(quota), round(share * 100), human_bytes(free),
    )  # fmt: skip
    return quota


def cache_root(cache_dir: Path) -> Path:
    return cache_dir / "cache"


def latents_dir(cache_dir: Path) -> Path:
    """The latent files' folder: the ingress's cache and the Ray workers must agree on it."""
    return ApproxCache.latents_dir(cache_root(cache_dir))


__all__ = ["ServerConfig", "app_for", "build_app", "latents_dir", "runtime_for"]
