"""The HTTP server: an OpenAI-compatible images API on the live policy core (wired in
``wiring.py``)."""

from promptserve.server.wiring import (
    ServerConfig,
    app_for,
    build_app,
    cache_quota,
    cache_root,
    engine_args,
    latents_dir,
    local_workers,
    runtime_for,
    served_name,
    worker_devices,
)

__all__ = [
    "ServerConfig",
    "app_for",
    "build_app",
    "cache_quota",
    "cache_root",
    "engine_args",
    "latents_dir",
    "local_workers",
    "runtime_for",
    "served_name",
    "worker_devices",
]
