"""What one tenant can do to another's results and to the cache: job and image churn against
another tenant's finished job and image link, and a flood of looks (a cache namespace each)
against the quota."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from promptserve.cache.latents import FOLDER_BYTES
from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer
from reliability.security import KEYS


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _until_done(client: httpx.Client, url: str, job_id: str, key: str) -> dict:
    for _ in range(600):
        job = client.get(f"{url}/v1/jobs/{job_id}", headers=_auth(key)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    return job


def churn(jobs: int = 600, link_requests: int = 52) -> dict:
    """Tenant A keeps a finished job and an image link; tenant B then creates and cancels
    ``jobs`` jobs and asks ``link_requests`` times for ten images by link. A's must still
    answer."""
    a, b = list(KEYS)
    cfg = ServerConfig(
        model="sdxl-reference", backend="modeled", speedup=50.0, embedder="hashing",
        cache_dir=Path(tempfile.mkdtemp()), slo_s=300, api_keys=KEYS,
    )  # fmt: skip
    with LiveServer(build_app(cfg)) as url, httpx.Client(timeout=120) as c:
        mine = c.post(f"{url}/v1/jobs", json={"prompt": "a's own job"}, headers=_auth(a)).json()
        _until_done(c, url, mine["id"], a)
        link = c.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a's own image", "response_format": "url"},
            headers=_auth(a),
        ).json()["data"][0]["url"]
        statuses: dict[int, int] = {}
        for i in range(jobs):
            made = c.post(f"{url}/v1/jobs", json={"prompt": f"b {i}"}, headers=_auth(b))
            statuses[made.status_code] = statuses.get(made.status_code, 0) + 1
            if made.status_code == 202:
                c.delete(f"{url}/v1/jobs/{made.json()['id']}", headers=_auth(b))
        for i in range(link_requests):
            c.post(
                f"{url}/v1/images/generations",
                json={"prompt": f"b links {i}", "n": 10, "response_format": "url"},
                headers=_auth(b),
            )
        job_after = c.get(f"{url}/v1/jobs/{mine['id']}", headers=_auth(a))
        image_after = c.get(f"{url}{link}")
    return {
        "b_jobs": jobs,
        "b_job_statuses": statuses,
        "b_link_requests": link_requests,
        "a_job_status": job_after.status_code,
        "a_job_kept": job_after.status_code == 200 and job_after.json()["status"] == "succeeded",
        "a_image_status": image_after.status_code,
    }


def namespace_flood(looks: int = 300, quota: int = 256 * 1024) -> dict:
    """One tenant sends ``looks`` requests, each with a negative prompt of its own (a cache
    namespace each): the latent files and their folders stay within the quota (plus the
    entry being written), and no empty folder is left."""
    cache_dir = Path(tempfile.mkdtemp())
    cfg = ServerConfig(
        model="sdxl-reference", backend="modeled", speedup=50.0, embedder="hashing",
        cache_dir=cache_dir, slo_s=300, cache_max_bytes=quota,
    )  # fmt: skip
    app = build_app(cfg)
    answered = 0
    with LiveServer(app) as url, httpx.Client(timeout=120) as c:
        for i in range(looks):
            r = c.post(
                f"{url}/v1/images/generations",
                json={"prompt": "a lighthouse", "negative_prompt": f"blurry, take {i}"},
            )
            answered += r.status_code == 200
        time.sleep(1.0)  # the last commits are on the cache thread
        cache = app.state.runtime.cache
        store = cache.store
        folders = [f for f in store.root.iterdir() if f.is_dir()]
        on_disk = store.bytes_used()
        stats = cache.stats()
    largest_entry = 8 * 4096 + FOLDER_BYTES  # the modelled engine's levels, a block each
    return {
        "looks": looks,
        "answered": answered,
        "quota_bytes": quota,
        "bytes_on_disk": on_disk,
        "within_quota_plus_one_entry": on_disk <= quota + largest_entry,
        "folders": len(folders),
        "empty_folders": sum(1 for f in folders if not any(f.iterdir())),
        "namespaces": cache.index.namespaces,
        "evictions": stats["evictions"],
    }


def run() -> dict:
    return {"churn": churn(), "namespace_flood": namespace_flood()}
