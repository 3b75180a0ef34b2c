"""Background work through the API (``priority``): a job is batch work by default and runs on
what interactive requests leave; interactive requests arriving meanwhile pause it at a step
boundary, and it resumes from there and ends in the same bytes as without them (the tiny
model, one GPU, step-level serving)."""

import re
import threading
import time

import httpx

from factories import client, modeled_app, tiny_app
from promptserve.server.live import LiveServer


def wait_final(url: str, job_id: str, within_s: float = 300.0) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        view = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if view.get("status") in ("succeeded", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, f"job {job_id} never ended: {view}"
        time.sleep(0.05)


def background(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'promptserve_background\{state="(\w+)"\} (\S+)', text)
    }


JOB = {"prompt": "a catalogue photo of a teapot", "seed": 7, "size": "64x64"}


def test_a_job_paused_by_interactive_requests_resumes_and_ends_in_the_same_bytes(tmp_path):
    app = tiny_app(tmp_path, policy="promptserve-step", workers=1)
    with LiveServer(app) as url:
        alone = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()
        alone = wait_final(url, alone["id"])
        assert alone["status"] == "succeeded"
        quiet = background(url)
        assert quiet["paused"] == 0 and quiet["running"] == 0 and quiet["waiting"] == 0

        stop, answered = threading.Event(), []

        def people() -> None:  # interactive requests, one after another, while the job runs
            api = client(url, timeout=120)
            while not stop.is_set():
                got = api.images.generate(prompt=f"a kite {len(answered)}", size="64x64")
                answered.append(got.data[0].model_extra["promptserve"]["level_k"])

        job = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()
        waiting = threading.Thread(target=people)
        waiting.start()
        try:
            busy = wait_final(url, job["id"])
        finally:
            stop.set()
            waiting.join(timeout=120)
        after = background(url)
    assert busy["status"] == "succeeded" and answered
    # the interactive requests took the GPU at step boundaries, and the job went on each time
    assert after["paused"] > 0 and after["resumed"] == after["paused"]
    # exactly where it stopped: the same image as its run with the GPU to itself
    assert busy["data"][0]["b64_json"] == alone["data"][0]["b64_json"]


def test_priority_is_checked_and_a_long_deadline_is_for_background_work(tmp_path):
    app = tiny_app(tmp_path, policy="promptserve-step", workers=1)
    day = 24 * 3_600_000
    with LiveServer(app) as url:
        bad = httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "priority": "urgent"}, timeout=60
        )
        assert bad.status_code == 400 and "priority" in bad.text
        long = httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "deadline_ms": day}, timeout=60
        )
        assert long.status_code == 400 and long.json()["error"]["param"] == "deadline_ms"
        interactive_job = httpx.post(
            f"{url}/v1/jobs", json={"prompt": "x", "priority": "interactive", "deadline_ms": day}
        )
        assert interactive_job.status_code == 400
        assert interactive_job.json()["error"]["param"] == "deadline_ms"
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "a teapot", "deadline_ms": day})
        assert job.status_code == 202
        assert wait_final(url, job.json()["id"])["status"] == "succeeded"


def test_a_tenant_past_its_jobs_in_flight_is_refused_and_its_kept_results_are_bounded(tmp_path):
    from promptserve.server.kept import Bounds

    app = modeled_app(
        tmp_path, policy="promptserve-step", speedup=1.0, jobs_in_flight=2,
        jobs_kept=Bounds(3, 1 << 20, 3600.0),
    )  # fmt: skip
    with LiveServer(app) as url:
        made = [httpx.post(f"{url}/v1/jobs", json={"prompt": f"slow {i}"}) for i in range(3)]
        assert [m.status_code for m in made] == [202, 202, 429]
        assert made[2].headers["retry-after"] and "jobs-in-flight" in made[2].text
        for m in made[:2]:  # cancelled: their slots free again
            httpx.delete(f"{url}/v1/jobs/{m.json()['id']}", timeout=60)
        ids = [httpx.post(f"{url}/v1/jobs", json={"prompt": f"k {i}"}).json()["id"] for i in (0, 1)]
        for job_id in ids:
            httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=60)
        # four finished jobs, three kept: the oldest is gone
        answers = [httpx.get(f"{url}/v1/jobs/{m.json()['id']}").status_code for m in made[:2]]
        answers += [httpx.get(f"{url}/v1/jobs/{job_id}").status_code for job_id in ids]
    assert answers == [404, 200, 200, 200]
