"""The durable job store (``server/jobstore.py``): a job answered 202 is a row on the disk; after
a SIGKILL and a restart on the same folder the unfinished ones run again and end, the finished
ones answer as before (a link's image too), an expired one says so, and a tenant's bounds delete
its own rows only."""

import signal
import time

import httpx
import numpy as np

from factories import tiny_app
from promptserve.engine.base import EditInput
from promptserve.server.jobs import JOB_BOUNDS, JobBook, JobState
from promptserve.server.jobstore import JobStore
from promptserve.server.kept import Bounds
from promptserve.server.live import LiveServer, start_server
from promptserve.server.schemas import ImageRequest

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


def wait_final(url: str, job_id: str, key: str, within_s: float = 120.0) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        view = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(key), timeout=30).json()
        if view.get("status") in ("succeeded", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, f"job {job_id} never ended: {view}"
        time.sleep(0.2)


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_a_row_keeps_the_request_and_an_edits_images_across_a_reopen(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    rng = np.random.default_rng(0)
    image, more = (
        rng.integers(0, 255, (8, 8, 3), np.uint8),
        rng.integers(0, 255, (4, 6, 3), np.uint8),
    )
    mask = rng.integers(0, 255, (8, 8), np.uint8)
    req = ImageRequest(prompt="a boat", seed=3, output_format="webp")
    store.accept("a" * 32, "t", req, EditInput(image, 0.4, mask, (more,)), 10.0, 40.0)
    store.accept("b" * 32, "t", req, None, 11.0, 41.0)
    store.finish("b" * 32, {"id": "b" * 32, "status": "failed", "step": 2}, 12.0, [])
    (first, second) = JobStore(tmp_path / "jobs.sqlite").load()  # another connection: on disk
    assert first.request == req and first.view is None and first.deadline == 40.0
    assert np.array_equal(first.edit.image, image) and np.array_equal(first.edit.mask, mask)
    assert first.edit.strength == 0.4 and np.array_equal(first.edit.more[0], more)
    assert second.view["status"] == "failed" and second.edit is None and second.finished == 12.0


def test_a_tenants_bounds_delete_its_own_rows_only(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    book = JobBook(Bounds(count=2, bytes=1 << 20, ttl_s=3600), store)
    req = ImageRequest(prompt="x")
    for i, tenant in enumerate(["a", "b", "a", "a", "a"]):
        job_id = f"{i:032x}"
        store.accept(job_id, tenant, req, None, i, i + 60)
        state = JobState(job_id, tenant)
        state.finish("succeeded")
        book.live[job_id] = state
        book.ended(state, float(i))
        store.forget(book.let_go())  # as the route does once a job has ended
    kept = {(row.tenant, row.id[-1]) for row in store.load()}
    assert kept == {("b", "1"), ("a", "3"), ("a", "4")}  # a's oldest two went, b's one stayed


def test_finished_jobs_answer_after_a_restart_and_an_expired_one_says_so(tmp_path):
    app = tiny_app(tmp_path, api_keys=KEYS)
    with LiveServer(app) as url:
        b64 = httpx.post(
            f"{url}/v1/jobs", json={"prompt": "a fox", "seed": 4}, headers=auth("key-a")
        )
        link = httpx.post(
            f"{url}/v1/jobs", json={"prompt": "a kite", "response_format": "url", "n": 2},
            headers=auth("key-a"),
        )  # fmt: skip
        assert b64.status_code == link.status_code == 202
        before = [wait_final(url, r.json()["id"], "key-a") for r in (b64, link)]
        links = [d["url"] for d in before[1]["data"]]
        images = [httpx.get(f"{url}{link}", headers=auth("key-a")).content for link in links]
    store = JobStore(tmp_path / "jobs.sqlite")  # a job accepted, then the server went down
    store.accept("c" * 32, "tenant-a", ImageRequest(prompt="late"), None, 1.0, time.time() - 1)
    with LiveServer(tiny_app(tmp_path, api_keys=KEYS)) as url:
        after = [wait_final(url, v["id"], "key-a") for v in before]
        again = [httpx.get(f"{url}{link}", headers=auth("key-a")) for link in links]
        expired = wait_final(url, "c" * 32, "key-a")
        other = httpx.get(f"{url}/v1/jobs/{before[0]['id']}", headers=auth("key-b"))
    assert after == before and before[0]["status"] == "succeeded"
    assert len(images) == 2 and images[0] != images[1]  # n = 2: two seeds
    assert [r.status_code for r in again] == [200, 200]
    assert [r.content for r in again] == images
    assert expired["status"] == "failed" and "expired" in expired["error"]["message"]
    assert other.status_code == 404  # still its tenant's alone


def test_jobs_accepted_before_a_sigkill_end_after_the_restart(tmp_path):
    """Six jobs on one CPU worker, the server killed as soon as they are accepted (most still
    queued), started again on the same folder: every one ends succeeded."""
    args = ["--model", "tiny", "--embedder", "hashing", "--workers", "1", "--slo", "600"]
    proc, url = start_server(args, tmp_path)
    try:
        ids = []
        for i in range(6):
            r = httpx.post(f"{url}/v1/jobs", json={"prompt": f"a harbour {i}"}, timeout=60)
            assert r.status_code == 202
            ids.append(r.json()["id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        unfinished = [row for row in JobStore(tmp_path / "jobs.sqlite").load() if row.view is None]
        assert unfinished  # the kill came before they ended
        proc, url = start_server(args, tmp_path)
        views = [wait_final(url, job_id, "unused") for job_id in ids]
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
    assert [v["status"] for v in views] == ["succeeded"] * 6
    assert all(v["data"][0]["b64_json"] for v in views)
    assert f"promptserve_jobs_restored {float(len(unfinished))}" in metrics


def test_the_sweep_deletes_jobs_past_their_age_from_the_store(tmp_path):
    """A quiet tenant's finished jobs leave the disk when they age out, read or not."""
    import asyncio

    from promptserve.server.jobroutes import sweep_jobs

    store = JobStore(tmp_path / "jobs.sqlite")
    book = JobBook(Bounds(count=8, bytes=1 << 20, ttl_s=0.05), store)
    store.accept("d" * 32, "quiet", ImageRequest(prompt="x"), None, 0.0, 60.0)
    state = JobState("d" * 32, "quiet")
    state.finish("succeeded")
    book.live[state.id] = state
    book.ended(state, time.monotonic())
    assert len(store.load()) == 1

    async def run() -> None:
        sweeper = asyncio.create_task(sweep_jobs(book, period_s=0.1))
        await asyncio.sleep(0.5)
        sweeper.cancel()

    asyncio.run(run())
    assert store.load() == [] and len(book.finished) == 0


def test_a_background_job_killed_mid_run_resumes_from_its_last_written_step(tmp_path):
    """A background job (a jobs' default) is written down every ``CHECKPOINT_STEPS``; the
    server SIGKILLed once a step is on the disk, then started again on the same folder: the
    job resumes there and ends in the bytes of its run without the kill."""
    args = ["--model", "tiny", "--embedder", "hashing", "--workers", "1", "--slo", "600"]
    body = {"prompt": "a catalogue photo of a teapot", "seed": 5, "size": "96x64"}
    with LiveServer(tiny_app(tmp_path / "once", workers=1, slo_s=600)) as url:  # uninterrupted
        whole = wait_final(url, httpx.post(f"{url}/v1/jobs", json=body).json()["id"], "unused")
    proc, url = start_server(args, tmp_path)
    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        job_id = httpx.post(f"{url}/v1/jobs", json=body, timeout=60).json()["id"]
        deadline = time.monotonic() + 120
        while not (written := store._db.execute("SELECT step FROM job_pauses").fetchall()):
            assert time.monotonic() < deadline, "no step was written down"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        (row,) = [r for r in store.load() if r.id == job_id]
        assert row.view is None and 0 < row.pauses[0].step < 50  # killed mid-run
        assert row.pauses[0].step % 10 == 0 and written
        proc, url = start_server(args, tmp_path)
        view = wait_final(url, job_id, "unused")
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
        store.close()
    assert view["status"] == "succeeded"
    assert 'promptserve_background{state="resumed"} 1.0' in metrics  # from its written step
    assert view["data"][0]["b64_json"] == whole["data"][0]["b64_json"]


def test_ten_thousand_jobs_made_and_cancelled_by_one_tenant_leave_anothers_job(tmp_path):
    """Tenant B makes and cancels 10,000 jobs through the job book and its store, as the
    routes do (accepted on the disk, ended, pushed out of B's shelf and deleted): A's
    finished job still answers A, from the book and from the disk after a reopen."""
    store = JobStore(tmp_path / "jobs.sqlite")
    store._db.execute("PRAGMA synchronous=OFF")  # the bounds are the subject, not the fsyncs
    book = JobBook(store=store)
    req = ImageRequest(prompt="x")
    mine = JobState("job-a", "tenant-a")
    store.accept(mine.id, "tenant-a", req, None, 0.0, 3600.0)
    book.add(mine)
    mine.finish("succeeded", [])
    book.ended(mine, 0.0)
    store.finish(mine.id, mine.view(), 0.0, [])
    for i in range(10_000):
        state = JobState(f"job-b-{i}", "tenant-b")
        store.accept(state.id, "tenant-b", req, None, float(i), 3600.0)
        book.add(state)
        state.finish("cancelled", error="cancelled")
        book.ended(state, i * 1e-3)
        store.forget(book.let_go())
        store.finish(state.id, state.view(), float(i), [])
    assert book.get("job-a", "tenant-a", 10.0) is mine  # within A's own bounds
    assert book.get("job-a", "tenant-b", 10.0) is None  # and never B's
    kept = {row.id: row for row in JobStore(tmp_path / "jobs.sqlite").load()}
    assert kept["job-a"].view["status"] == "succeeded"
    assert sum(row.tenant == "tenant-b" for row in kept.values()) <= JOB_BOUNDS.count
    store.close()
