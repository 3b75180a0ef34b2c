"""Serving on Ray Serve: engine workers as replicas, the API and the planner as the ingress.

Same policy core as the single-process server (``promptserve.server.Runtime``); only the
``Workers`` differ. Layout: one deployment ``worker-i`` of one replica per GPU
(``num_gpus=1`` on a GPU cluster, fractional CPUs for tests) and one ingress replica that holds
the FastAPI app, the planner, the dispatcher and the cache index. The index lives with the
planner (one actor); the latent files live under ``cache_dir``, a folder path that every node
can reach (a shared file system on a multi-node cluster), so the ingress can be rescheduled on
any node and find its cache. ``LatentStore`` is the interface to swap for an object store.
"""

from __future__ import annotations

from promptserve.distributed.deploy import RaySettings, deploy_app, run_on_ray

__all__ = ["RaySettings", "deploy_app", "run_on_ray"]
