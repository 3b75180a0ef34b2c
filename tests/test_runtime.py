"""The live runtime survives its own failures: a loop that raises, a loop that is gone, a job
whose intake fails. Real server on localhost, the modelled engine, the official client."""

import httpx
import numpy as np
import pytest

from factories import client, modeled_app
from promptserve.cache.embed import HashingEmbedder
from promptserve.edge.keys import DEFAULT_TENANT
from promptserve.server.live import LiveServer


def test_a_scheduler_step_that_raises_loses_nothing_and_the_loop_goes_on(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve")
    runtime = app.state.runtime
    real_schedule, calls = runtime.sched.schedule, []

    def schedule_that_raises_once(now):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("injected scheduler fault")
        return real_schedule(now)

    runtime.sched.schedule = schedule_that_raises_once
    with LiveServer(app) as url:
        res = client(url, timeout=30).images.generate(prompt="a kite over dunes", size="1024x1024")
        ready = httpx.get(f"{url}/readyz")
    assert res.data[0].model_extra["promptserve"]["level_k"] == 0
    assert runtime.counters.loop_errors == 1 and len(calls) > 1
    assert ready.status_code == 200


def test_readyz_goes_unready_when_a_loop_is_gone(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve")
    runtime = app.state.runtime
    with LiveServer(app) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        replan = runtime.tasks[1]
        replan.get_loop().call_soon_threadsafe(replan.cancel)
        for _ in range(100):
            if replan.done():
                break
            httpx.get(f"{url}/healthz")
        answer = httpx.get(f"{url}/readyz")
    assert answer.status_code == 503
    assert "loop has stopped" in answer.json()["error"]["message"]


def test_a_job_whose_intake_fails_gets_an_answer_not_a_hang(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve")

    class BrokenEmbedder:
        dim = app.state.runtime.embedder.dim

        def embed(self, texts, namespaces=None):
            raise OSError("embedding model unavailable")

    app.state.runtime.embedder = BrokenEmbedder()
    with LiveServer(app) as url:
        res = httpx.post(f"{url}/v1/jobs", json={"prompt": "a red kite"}, timeout=30)
        gen = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red kite"}, timeout=30)
    assert res.status_code == 500 and gen.status_code == 500  # both answer, neither hangs
    for answer in (res, gen):  # the internal error stays in the server's log
        assert "embedding model unavailable" not in answer.json()["error"]["message"]
        assert answer.json()["error"]["type"] == "server_error"


def test_a_batch_that_overruns_fails_none_of_its_requests_that_can_still_finish(
    tmp_path, monkeypatch
):
    """GPU 0's first batch never returns: after the batch timeout its GPU is out and its
    requests run on GPU 1 (another tenant's among them), each answered once."""
    import asyncio
    import importlib
    import threading

    execute = importlib.import_module("promptserve.workers.execute")  # the module, not its call
    monkeypatch.setattr(execute, "BATCH_TIMEOUT_FLOOR_S", 1.0)
    monkeypatch.setattr(execute, "BATCH_TIMEOUT_FACTOR", 1.0)
    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve", workers=2)
    runtime = app.state.runtime
    real_run, stuck = runtime.workers.run, threading.Event()

    async def first_batch_on_gpu0_hangs(gpu, items, on_step, refs=None):
        if gpu == 0 and not stuck.is_set():
            stuck.set()
            await asyncio.sleep(3600)
        return await real_run(gpu, items, on_step, refs)

    runtime.workers.run = first_batch_on_gpu0_hangs
    with LiveServer(app) as url:
        oai = client(url, timeout=120)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda i: oai.images.generate(prompt=f"a kite {i}", size="1024x1024", n=1),
                    range(6),
                )
            )
    assert stuck.is_set() and runtime.counters.batch_timeouts == 1
    assert len(answers) == 6 and all(a.data[0].b64_json for a in answers)
    assert runtime.counters.retried >= 1  # the stuck batch's requests ran again elsewhere


def test_the_periodic_re_plan_solves_off_the_event_loop(tmp_path):
    import threading
    import time

    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve")
    runtime = app.state.runtime
    threads: list[int] = []

    class Recording:  # the same policy, noting the thread each plan is solved on
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def plan(self, *args, **kwargs):
            threads.append(threading.get_ident())
            return self.inner.plan(*args, **kwargs)

    runtime.sched.policy = Recording(runtime.sched.policy)  # what the scheduler solves with
    server = LiveServer(app)
    with server as url:
        loop_thread = server.thread.ident  # uvicorn runs the event loop on this thread
        c = client(url, timeout=30)
        for i in range(4):  # moves the load estimate, so the next period re-plans
            c.images.generate(prompt=f"a kite {i}", size="1024x1024")
        deadline = time.monotonic() + 3 * runtime.policy.replan_s
        while not threads and time.monotonic() < deadline:
            time.sleep(0.2)
    assert threads, "no re-plan ran"
    assert loop_thread not in threads


def test_cache_reads_and_writes_run_off_the_event_loop(tmp_path):
    """Lookups (on their own thread), latent reads, latent writes and manifest commits (on the
    cache thread) never run on the thread that runs the event loop."""
    import threading

    from factories import tiny_app

    app = tiny_app(tmp_path, policy="clipper-ht+shed+admit")  # a repeat resumes from its latent
    cache = app.state.runtime.cache
    seen: dict[str, set[int]] = {}
    for name in ("lookup", "latent", "insert", "record_hit"):
        real = getattr(cache, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            seen.setdefault(_name, set()).add(threading.get_ident())
            return _real(*args, **kwargs)

        setattr(cache, name, recording)
    server = LiveServer(app)
    with server as url:
        loop_thread = server.thread.ident
        c = client(url, timeout=120)
        for _ in range(2):  # the second is an exact repeat: it reads the first's latent
            c.images.generate(prompt="a lighthouse at dusk, oil painting", size="64x64")
    assert {"lookup", "latent", "insert", "record_hit"} <= set(seen)
    assert all(loop_thread not in threads for threads in seen.values()), seen


def test_writes_queued_while_the_cache_thread_is_busy_go_in_one_group(tmp_path):
    """Answered runs' writes queued behind other cache work take one trip and one group; one
    queued after that trip has started takes the next; cache work queued after a write runs
    after it."""
    import asyncio
    import threading

    runtime = modeled_app(tmp_path, speedup=50.0, policy="promptserve").state.runtime
    cache = runtime.cache
    written: list[tuple[int, bool]] = []

    def write(i: int) -> None:
        written.append((i, cache._grouped))

    async def go() -> tuple[list, list]:
        loop, gate = asyncio.get_running_loop(), threading.Event()
        busy = loop.run_in_executor(runtime.io.writer, gate.wait, 10)
        for i in range(5):
            runtime.io.later(write, i)
        seen_after = runtime.io.call(lambda: list(written))  # queued behind the writes
        gate.set()
        await busy
        before = await seen_after
        trips = runtime.counters.write_trips
        runtime.io.later(write, 5)
        await asyncio.gather(*runtime.io.writes)
        return before, [trips, runtime.counters.write_trips]

    before, trips = asyncio.run(go())
    assert before == [(i, True) for i in range(5)]  # all five, in order, inside one group
    assert trips == [1, 2]
    assert written[-1] == (5, True)
    runtime.io.shutdown()


def test_a_lookup_does_not_wait_behind_the_cache_threads_writes(tmp_path):
    """The cache thread held by a slow write: a lookup still answers, from the entries indexed
    so far."""
    import asyncio
    import threading

    runtime = modeled_app(tmp_path, speedup=50.0, policy="promptserve").state.runtime
    vec = HashingEmbedder().embed(["a red kite"])[0]
    runtime.cache.insert(DEFAULT_TENANT, "a red kite", vec, {5: np.ones((4, 8, 8), np.float32)}, 0)

    async def go():
        gate = threading.Event()
        busy = asyncio.get_running_loop().run_in_executor(runtime.io.writer, gate.wait, 30)
        lookup = runtime.io.lookup(lambda: [runtime.cache.lookup(DEFAULT_TENANT, vec)])
        (hit,) = await asyncio.wait_for(lookup, 10)
        gate.set()
        await busy
        return hit

    hit = asyncio.run(go())
    assert hit is not None and hit.entry.prompt == "a red kite" and hit.similarity > 0.99
    runtime.io.shutdown()


def test_a_burst_of_arrivals_is_embedded_in_few_calls(tmp_path):
    """While one embedding call runs, arrivals queue; the next call takes them all."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    app = modeled_app(tmp_path, speedup=50.0, policy="promptserve")
    runtime = app.state.runtime
    inner, sizes, release = runtime.embedder, [], threading.Event()

    class Gated:  # the first call waits until the burst has queued behind it
        dim = inner.dim

        def embed(self, texts, namespaces=None):
            sizes.append(len(texts))
            if len(sizes) == 1:
                release.wait(10)
            return inner.embed(texts)

    runtime.embedder = Gated()
    with LiveServer(app) as url:
        c = client(url, timeout=60)
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(c.images.generate, prompt=f"a kite {i}", size="1024x1024")
                for i in range(6)
            ]
            # the first call takes what had queued when it started (one prompt, or a few when
            # the requests raced in); the rest queue behind it
            for _ in range(600):  # at most 30 s
                if (sizes[0] if sizes else 0) + len(runtime._embed._burst._queued) >= 6:
                    break
                threading.Event().wait(0.05)
            release.set()
            answers = [f.result() for f in futures]
    assert len(answers) == 6
    assert sum(sizes) == 6 and len(sizes) == 2, sizes  # six prompts, two forward passes


def test_the_runtime_reads_time_only_from_its_injected_clock(tmp_path):
    """Deadlines, queueing and compute times, and lateness come from the clock it is given:
    on a clock 1000 s ahead of the wall clock that jumps 100 s while the batch runs, a 60 s
    request is late by it."""
    import asyncio
    import time

    from promptserve.policy import get_policy
    from promptserve.server.runtime import JobHandle, LiveRuntime

    parts = modeled_app(tmp_path, speedup=50.0).state.runtime
    skew = [1000.0 - time.monotonic()]
    runtime = LiveRuntime(
        parts.workers,
        parts.cache,
        parts.embedder,
        get_policy("clipper-ha"),
        parts.setting,
        parts.quality,
        clock=lambda: time.monotonic() + skew[0],
    )

    def emit(kind, data):
        if kind == "level":  # the batch has started: 100 s pass on the fake clock
            skew[0] += 100.0

    async def serve():
        runtime.start()
        try:
            return await runtime.submit("a kite over dunes", "default", 60.0, JobHandle(emit))
        finally:
            await runtime.stop()

    served = asyncio.run(serve())
    # the jump is in the compute time; a time read from the wall clock against the injected
    # one would be off by the 1000 s skew (no bound on how long the run really took)
    assert 100.0 <= served.compute_s < 1000.0 and 0.0 <= served.queue_s < 1000.0
    assert runtime.counters.by_outcome["late"] == 1 and runtime.counters.by_outcome["served"] == 0


def test_each_engine_builds_and_computes_on_one_thread_of_its_own(tmp_path):
    """torch's OpenMP team belongs to the calling thread: batches that land on any pool thread
    (and an embedder sharing them) slowed the tiny model 2.5x. Every batch of a worker runs on
    the thread that built it, with the intra-op thread count set for it; embedding runs on
    another thread with one."""
    import threading

    import torch

    from factories import tiny_app
    from promptserve.engine.threads import torch_threads_for

    app = tiny_app(tmp_path, policy="promptserve")  # whole batches: each a generate() call
    runtime = app.state.runtime
    engine = runtime.workers.engines[0]
    seen: list[tuple[int, int]] = []
    embedded_on: list[tuple[int, int]] = []
    real_generate, real_embed = engine.generate, runtime.embedder.embed

    def generate(items, on_step=None):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return real_generate(items, on_step)

    def embed(texts, namespaces=None):
        embedded_on.append((threading.get_ident(), torch.get_num_threads()))
        return real_embed(texts, namespaces)

    engine.generate, runtime.embedder.embed = generate, embed
    built_on = runtime.workers.threads[0].call(threading.get_ident)
    with LiveServer(app) as url:
        c = client(url, timeout=120)
        for i in range(3):
            c.images.generate(prompt=f"a lighthouse {i}", size="64x64")
    assert len(seen) == 3 and {t for t, _ in seen} == {built_on}
    assert {n for _, n in seen} == {torch_threads_for(1)}
    assert embedded_on and all(t != built_on and n == 1 for t, n in embedded_on)


# every request at the fastest level (25): a near twin resumes there, above its own K_opt
@pytest.mark.parametrize("policy", ["clipper-ht+shed+admit", "continuous-ht"])
def test_resumed_entries_hold_every_level_and_a_partial_one_is_no_neighbour(tmp_path, policy):
    """The policy lets a request with a neighbour run at any level. So a resumed run's entry
    takes its neighbour's lower levels, and an entry that lacks a level (left by an older
    server, which kept only what a resumed run passed, or its files lost) starts nothing:
    otherwise a request routed to a level it lacks would run from noise inside a batch planned
    for a resumed run, and overrun it."""
    app = modeled_app(tmp_path, policy=policy, speedup=50.0)
    runtime = app.state.runtime
    vec = HashingEmbedder().embed
    partial = {k: np.ones((2, 2), np.float32) for k in (20, 25)}
    runtime.cache.insert(DEFAULT_TENANT, "a blue whale", vec(["a blue whale"])[0], partial, 0.0)
    with LiveServer(app) as url:
        images = client(url).images
        whale = images.generate(prompt="a blue whale", size="1024x1024").data[0]
        fox = images.generate(prompt="a red fox in the snow", size="1024x1024").data[0]
        dusk = images.generate(prompt="a red fox in the snow at dusk", size="1024x1024").data[0]
    whale, fox, dusk = (d.model_extra["promptserve"] for d in (whale, fox, dusk))
    assert whale["similarity"] > 0.99 and whale["level_k"] == 0 and not whale["cache_hit"]
    assert fox["level_k"] == 0 and dusk["cache_hit"] and dusk["level_k"] == 25
    levels = [lv for lv in runtime.workers.levels if lv > 0]
    resumed = next(e for e in runtime.cache.index if e.prompt == "a red fox in the snow at dusk")
    assert sorted(resumed.latent_keys) == levels  # 25 its own, 5 to 20 its neighbour's
    assert all(runtime.cache.store.path(key).exists() for key in resumed.latent_keys.values())


def test_an_unexpected_failure_answers_json_without_its_internals_and_metrics_go_on(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0)
    runtime = app.state.runtime
    real_load = runtime.load

    def broken_load():
        raise RuntimeError("/secret/path/to/weights: tensor mismatch")

    runtime.load = broken_load
    with LiveServer(app) as url:
        r = httpx.get(f"{url}/metrics", timeout=30)
        import time

        deadline = time.monotonic() + 10
        while runtime.counters.loop_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # the history recorder met the same failure, once a second
        runtime.load = real_load

        def samples() -> int:
            return len(httpx.get(f"{url}/v1/metrics/history", timeout=30).json()["samples"])

        before, deadline = samples(), time.monotonic() + 10
        while samples() <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        after = samples()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text
    assert runtime.counters.loop_errors >= 1  # logged and counted
    assert after > before  # and the recorder lives on: the history grows again
