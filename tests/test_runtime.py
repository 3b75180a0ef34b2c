"""The live runtime survives its own failures: a loop that raises, a loop that is gone, a job
whose intake fails. Real server on localhost, the modelled engine, the official client."""

import httpx

from factories import client, modeled_app
from promptserve.server.live import LiveServer


def test_a_scheduler_step_that_raises_loses_nothing_and_the_loop_goes_on(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0)
    runtime = app.state.runtime
    real_step, calls = runtime.dispatcher.step, []

    def step_that_raises_once(now):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("injected scheduler fault")
        return real_step(now)

    runtime.dispatcher.step = step_that_raises_once
    with LiveServer(app) as url:
        res = client(url, timeout=30).images.generate(prompt="a kite over dunes", size="1024x1024")
        ready = httpx.get(f"{url}/readyz")
    assert res.data[0].model_extra["promptserve"]["level_k"] == 0
    assert runtime.counters.loop_errors == 1 and len(calls) > 1
    assert ready.status_code == 200


def test_readyz_goes_unready_when_a_loop_is_gone(tmp_path):
    app = modeled_app(tmp_path, speedup=50.0)
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
    app = modeled_app(tmp_path, speedup=50.0)

    class BrokenEmbedder:
        dim = app.state.runtime.embedder.dim

        def embed(self, texts):
            raise OSError("embedding model unavailable")

    app.state.runtime.embedder = BrokenEmbedder()
    with LiveServer(app) as url:
        res = httpx.post(f"{url}/v1/jobs", json={"prompt": "a red kite"}, timeout=30)
        gen = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red kite"}, timeout=30)
    assert res.status_code == 503
    assert "embedding model unavailable" in res.json()["error"]["message"]
    assert gen.status_code >= 500  # the synchronous endpoint fails too, and answers


def test_the_periodic_re_plan_solves_off_the_event_loop(tmp_path):
    import threading
    import time

    app = modeled_app(tmp_path, speedup=50.0)
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

    runtime.policy = Recording(runtime.policy)
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
