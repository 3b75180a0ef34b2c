"""Step-level serving live: the tiny model end to end through the official client."""

import dataclasses
import json
import threading
import time

import httpx
import pytest

from factories import client, modeled_app, tiny_app
from promptserve.loadgen import read_metric
from promptserve.server.live import LiveServer


def test_promptserve_step_serves_the_tiny_model_and_reports_real_steps(tmp_path):
    app = tiny_app(tmp_path, policy="promptserve-step")
    runtime = app.state.runtime
    assert runtime.sched.stepwise  # one running batch per GPU
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
        body = {"prompt": "a storm", "priority": "interactive"}  # beside the other, not apart
        job = httpx.post(f"{url}/v1/jobs", json=body, timeout=30).json()
        deadline = time.monotonic() + 20
        while sum(runtime.load().inflight) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(runtime.load().inflight) == 2
        cancelled = httpx.delete(f"{url}/v1/jobs/{job['id']}", timeout=60).json()
        assert cancelled["status"] == "cancelled"
        assert sum(runtime.load().inflight) == 1  # the slot is free at once
        kept.join(120)
    assert runtime.counters.by_outcome["served"] == 1
    assert not runtime.pending


class ForgetsOnce:
    """Step workers that lose their members once, as a Ray replica replaced between two steps
    does (the next call reaches a fresh replica with an empty runner)."""

    def __init__(self, inner, at_call: int) -> None:
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def advance(self, g, call):
        self.calls += 1
        if self.calls == self.at_call:
            runner = self.inner.runners[g]
            for key in list(runner.steps_left()):
                runner.cancel(key)
        one = dataclasses.replace(call, steps=1, interrupt=None)  # one step a call, as on Ray
        return await self.inner.advance(g, one)


def test_members_a_worker_lost_between_steps_rejoin_and_are_served(tmp_path):
    app = modeled_app(tmp_path, policy="promptserve-step", speedup=20.0)
    runtime = app.state.runtime
    runtime.workers = ForgetsOnce(runtime.workers, at_call=5)
    with LiveServer(app) as url:
        c = client(url, timeout=120)
        answers = []
        threads = [
            threading.Thread(target=lambda p=p: answers.append(c.images.generate(prompt=p)))
            for p in ("a calm sea", "a storm")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(answers) == 2 and all(len(a.data) == 1 for a in answers)
    assert runtime.counters.retried >= 1  # someone was lost at call 5 and joined again
    assert runtime.counters.by_outcome["served"] == 2
    assert not runtime.pending and not any(g.by_id for g in runtime.sched.gpus)


def test_the_modelled_backend_caches_stand_in_latents_and_resumes_from_them(tmp_path):
    # every request at the fastest level it tolerates: a twin resumes at K > 0, pinned or not
    for policy in ("clipper-ht+shed+admit", "continuous-ht+shed+admit"):
        app = modeled_app(tmp_path / policy, policy=policy, speedup=50.0)
        with LiveServer(app) as url:
            c = client(url, timeout=120)
            first = c.images.generate(prompt="a quiet harbour at night").data[0]
            twin = c.images.generate(prompt="a quiet harbour at night").data[0]
            ratio = [
                ln for ln in httpx.get(f"{url}/metrics").text.splitlines()
                if ln.startswith("promptserve_cache_hit_ratio")
            ]  # fmt: skip
        assert first.model_extra["promptserve"]["level_k"] == 0
        meta = twin.model_extra["promptserve"]
        assert meta["cache_hit"] is True and meta["level_k"] == meta["k_opt"] > 0, policy
        assert float(ratio[0].split()[-1]) > 0
        files = list((tmp_path / policy).rglob("*.safetensors"))
        assert len(files) >= len(app.state.runtime.levels) - 1  # one stand-in per level passed


class LosesWorker:
    """Workers whose GPU 1 dies at its first step and answers pings only once ``back`` is set
    (a Ray replica lost, then replaced)."""

    def __init__(self, inner) -> None:
        self.inner, self.back, self.lost = inner, threading.Event(), False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def advance(self, g, call):
        if g == 1 and not self.lost:
            from promptserve.workers.base import WorkerLost

            self.lost = True
            raise WorkerLost(1, "killed")
        return await self.inner.advance(g, call)

    async def alive(self):
        return [True, self.back.is_set()]


def test_a_step_level_server_that_loses_a_worker_says_so_and_prices_without_it(tmp_path):
    app = modeled_app(tmp_path, policy="promptserve-step", speedup=20.0, workers=2)
    runtime = app.state.runtime
    runtime.workers = workers = LosesWorker(runtime.workers)
    both = runtime.sched.pricing.steps_capacity(runtime.setting.slo_s)

    def up_count(url):
        return read_metric(url, "promptserve_workers_up")

    with LiveServer(app) as url:
        c = client(url, timeout=120)
        answers = []
        threads = [  # at once: the second is placed on GPU 1, which dies at its first step
            threading.Thread(target=lambda p=p: answers.append(c.images.generate(prompt=p)))
            for p in ("a calm sea", "a storm", "a reef")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(answers) == 3 and workers.lost  # and its member was served elsewhere
        assert up_count(url) == 1
        ready = httpx.get(url + "/readyz").json()
        assert ready["workers"] == 2 and ready["workers_up"] == 1
        assert runtime.sched.pricing.steps_capacity(runtime.setting.slo_s) == pytest.approx(
            both / 2
        )
        workers.back.set()
        deadline = time.monotonic() + 10
        while up_count(url) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert up_count(url) == 2 and httpx.get(url + "/readyz").json()["workers_up"] == 2
    assert runtime.counters.retried >= 1 and not runtime.pending


def test_a_request_cancelled_while_its_join_reads_the_cache_never_joins_the_runner(tmp_path):
    """Cancelled in the gap between the boundary that admits it and the step it would join:
    it is answered cancelled and the runner never holds it (a ghost member would take a slot
    the scheduler does not count)."""
    import asyncio

    from promptserve.server.runtime import Cancelled, JobHandle

    app = modeled_app(tmp_path, policy="promptserve-step", speedup=20.0)
    runtime = app.state.runtime
    real, handle = runtime.item_for, JobHandle(lambda kind, data: None)

    async def scenario():
        loop = asyncio.get_running_loop()

        def item_for(p, level, interval=1):  # on the cache thread: the caller cancels meanwhile
            loop.call_soon_threadsafe(runtime.cancel, handle)
            time.sleep(0.2)
            return real(p, level, interval)

        runtime.item_for = item_for
        runtime.start()
        try:
            with pytest.raises(Cancelled):
                await runtime.submit("a kite", "default", 60.0, handle)
            await asyncio.sleep(0.3)  # a few more boundaries
            return runtime.workers.runners[0].steps_left()
        finally:
            await runtime.stop()

    assert asyncio.run(scenario()) == {}
    assert not runtime.pending and runtime.sched.pending() == 0


class Recording:
    """Step workers that record each call's allowance and what it ran."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.entered = inner, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def advance(self, g, call):
        self.entered.set()
        done = await self.inner.advance(g, call)
        self.calls.append((g, len(call.joins), call.steps, done.ran))
        return done


def test_a_gpu_with_nothing_to_change_runs_to_its_next_finish_in_one_call(tmp_path):
    """Alone on a GPU, a member runs its steps in few calls (no trip to the event loop per
    step), and every step is counted; a second arrival stops the run at the next step, so it
    joins as soon as with one step a call; a streamed request is stepped one call a step, so
    that it hears every step."""
    app = modeled_app(tmp_path, policy="promptserve-step", speedup=5.0, workers=1)
    runtime = app.state.runtime
    runtime.workers = rec = Recording(runtime.workers)
    with LiveServer(app) as url:
        c = client(url, timeout=120)
        first = threading.Thread(target=lambda: c.images.generate(prompt="a calm sea"))
        first.start()
        assert rec.entered.wait(60)
        time.sleep(0.2)  # several steps (17 ms each at this speed) into its 50
        second = c.images.generate(prompt="a storm over the cliffs")
        first.join(120)
        alone = list(rec.calls)
        rec.calls.clear()
        with httpx.stream(
            "POST",
            f"{url}/v1/images/generations",
            json={"prompt": "a lighthouse", "stream": True, "partial_images": 1},
            timeout=120,
        ) as r:
            steps = [line for line in r.iter_lines() if line.startswith("data:")]
    assert second.data[0].model_extra["promptserve"]["level_k"] == 0
    total = runtime.workers.total_steps
    joined = next(i for i, c in enumerate(alone) if c[1] and i > 0)  # the second's join
    before = sum(ran for *_, ran in alone[:joined])  # the first's steps alone
    assert 0 < before < total
    # every step of both, none lost or doubled: the first's 50, then the second's beyond them
    assert sum(ran for *_, ran in alone) == total + before
    assert len(alone) < total // 4  # far fewer calls than steps
    assert alone[joined - 1][3] < alone[joined - 1][2], alone  # the arrival cut that run short
    # one step a call (a join's own call, its encode before the first step, runs none)
    assert rec.calls and all(steps_allowed <= 1 for _, _, steps_allowed, _ in rec.calls)
    assert any(steps_allowed == 1 for _, _, steps_allowed, _ in rec.calls)
    assert steps  # the stream got its events
