"""Step-level serving live: the tiny model end to end through the official client."""

import json
import threading
import time

import httpx

from factories import client, modeled_app, tiny_app
from promptserve.server.live import LiveServer
from promptserve.server.stepruntime import StepRuntime


def test_promptserve_step_serves_the_tiny_model_and_reports_real_steps(tmp_path):
    app = tiny_app(tmp_path, policy="promptserve-step")
    runtime = app.state.runtime
    assert isinstance(runtime, StepRuntime)
    with LiveServer(app) as url:
        c = client(url, timeout=120)
        first = c.images.generate(prompt="a lighthouse at dusk", size="64x64")
        meta = first.data[0].model_extra["promptserve"]
        assert meta["level_k"] == 0 and meta["similarity"] is None  # empty cache: a miss
        again = c.images.generate(prompt="a lighthouse at dusk", size="64x64")
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "a red kite"}, timeout=30).json()
        with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", timeout=60) as events:
            lines = [ln for ln in events.iter_lines() if ln.startswith("data:")]
        metrics = httpx.get(f"{url}/metrics").text
    twin = again.data[0].model_extra["promptserve"]
    assert twin["similarity"] > 0.99 and twin["k_opt"] == runtime.levels[-1]  # found its twin
    assert twin["level_k"] == 0 and twin["cache_hit"] is False  # with slack: full quality
    steps = [json.loads(ln[5:])["step"] for ln in lines if '"step"' in ln and '"of"' in ln]
    total = runtime.workers.total_steps
    assert steps == list(range(1, total + 1))  # every real step of this request, in order
    assert runtime.counters.by_outcome["served"] == 3
    assert 'promptserve_inflight{gpu="0"} 0.0' in metrics


def test_cancelling_a_running_member_frees_its_slot(tmp_path):
    app = modeled_app(tmp_path, policy="promptserve-step", speedup=2.0)
    runtime = app.state.runtime
    with LiveServer(app) as url:
        kept = threading.Thread(
            target=lambda: client(url, timeout=120).images.generate(prompt="a calm sea"),
        )
        kept.start()
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "a storm"}, timeout=30).json()
        deadline = time.monotonic() + 20
        while sum(runtime.inflight()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(runtime.inflight()) == 2
        cancelled = httpx.delete(f"{url}/v1/jobs/{job['id']}", timeout=60).json()
        assert cancelled["status"] == "cancelled"
        assert sum(runtime.inflight()) == 1  # the slot is free at once
        kept.join(120)
    assert runtime.counters.by_outcome["served"] == 1
    assert not runtime.pending


def test_step_policies_refuse_ray_with_a_clear_message(tmp_path):
    import pytest

    from promptserve.errors import InputError
    from promptserve.server import ServerConfig, app_for
    from promptserve.server.workers import LocalWorkers

    workers = modeled_app(tmp_path).state.runtime.workers

    class RayLike:  # the Ray workers' surface: no in-process engines
        shared_store = True
        name, total_steps, levels = workers.name, workers.total_steps, workers.levels
        profile, count = workers.profile, 2

    assert isinstance(workers, LocalWorkers)
    config = ServerConfig(policy="promptserve-step", embedder="hashing", cache_dir=tmp_path)
    with pytest.raises(InputError, match="in-process only"):
        app_for(config, RayLike(), 64)
