"""Durable jobs through crashes: two tenants submit 200 background jobs with webhooks to a
local receiver; the server is SIGKILLed twice mid-run and started again on the same folders.
Every accepted job must end succeeded (or failed as expired, saying so), every webhook arrive
with its tenant's valid signature (a repeat only under the same id), and neither tenant read
the other's jobs."""

from __future__ import annotations

import base64
import json
import signal
import tempfile
import time
from pathlib import Path

import httpx

from promptserve.server.webhooks import verify
from reliability.hooks import Receiver
from reliability.server import start_server

KEY_A, KEY_B = "key-jobs-tenant-a-0123", "key-jobs-tenant-b-0123"
SECRET_A = "whsec_" + base64.b64encode(b"reliability tenant a key").decode()
FINAL = ("succeeded", "failed", "cancelled")


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _views(url: str, owned: dict[str, str]) -> dict[str, dict]:
    with httpx.Client(timeout=30) as c:
        return {j: c.get(f"{url}/v1/jobs/{j}", headers=_auth(k)).json() for j, k in owned.items()}


def run(jobs: int = 200, kills: int = 2, speedup: float = 20.0, within_s: float = 180.0) -> dict:
    folder = Path(tempfile.mkdtemp())
    keys = folder / "keys.txt"
    keys.write_text(f"{KEY_A}:tenant-a:{SECRET_A}\n{KEY_B}:tenant-b\n")
    receiver = Receiver(fail_first=3)  # the first attempts fail: retried
    args = [
        "--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing",
        "--slo", "600", "--speedup", str(speedup), "--api-keys", str(keys),
        "--webhook-allow", "127.0.0.1", "--jobs-dir", str(folder / "jobs"),
    ]  # fmt: skip
    proc, url = start_server(args, folder / "cache")
    owned: dict[str, str] = {}  # job -> its tenant's key
    secrets = {KEY_A: SECRET_A}
    refused = 0
    killed_with: list[int] = []
    try:
        with httpx.Client(timeout=60) as c:
            for i in range(jobs):
                key = KEY_A if i % 2 == 0 else KEY_B
                body = {"prompt": f"catalogue item {i}", "webhook_url": receiver.url}
                made = c.post(f"{url}/v1/jobs", json=body, headers=_auth(key))
                if made.status_code != 202:
                    refused += 1
                    continue
                owned[made.json()["id"]] = key
                secrets.setdefault(key, made.json().get("webhook_secret"))
        for kill in range(kills):  # mid-run: once a share of the jobs has ended
            target = len(owned) * (kill + 1) // (kills + 1)
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                done = sum(v.get("status") in FINAL for v in _views(url, owned).values())
                if done >= target:
                    break
                time.sleep(0.2)
            killed_with.append(done)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc, url = start_server(args, folder / "cache")
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            views = _views(url, owned)
            if all(v.get("status") in FINAL for v in views.values()):
                break
            time.sleep(0.5)
        hooked = {json.loads(d["body"])["data"]["id"] for d in receiver.deliveries()}
        while time.monotonic() < deadline and not set(owned) <= hooked:
            time.sleep(0.5)
            hooked = {json.loads(d["body"])["data"]["id"] for d in receiver.deliveries()}
        with httpx.Client(timeout=30) as c:  # each tenant asks for the other's jobs
            crossed = sum(
                c.get(f"{url}/v1/jobs/{j}", headers=_auth(KEY_B if k == KEY_A else KEY_A))
                .status_code != 404
                for j, k in owned.items()
            )  # fmt: skip
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        proc.kill()
        receiver.close()
    statuses: dict[str, int] = {}
    for v in views.values():
        label = v.get("status", "missing")
        if label == "failed" and "expired" in v.get("error", {}).get("message", ""):
            label = "expired"
        statuses[label] = statuses.get(label, 0) + 1
    got = receiver.deliveries()
    invalid, wrong_id, by_id = 0, 0, {}
    for d in got:
        job_id = json.loads(d["body"])["data"]["id"]
        secret = secrets.get(owned.get(job_id, ""), "")
        invalid += not (secret and verify(d["headers"], d["body"], secret))
        msg = {k.lower(): v for k, v in d["headers"].items()}["webhook-id"]
        wrong_id += msg != f"msg_{job_id}"
        by_id[msg] = by_id.get(msg, 0) + 1
    return {
        "jobs": jobs,
        "accepted": len(owned),
        "refused": refused,
        "kills": kills,
        "ended_before_each_kill": killed_with,
        "statuses": statuses,
        "every_job_ended": statuses.get("succeeded", 0) + statuses.get("expired", 0) == len(owned),
        "deliveries": len(got),
        "jobs_told": len(set(owned) & {m[4:] for m in by_id}),
        "invalid_signatures": invalid,
        "repeats_under_another_id": wrong_id,
        "repeated": sum(n - 1 for n in by_id.values()),
        "cross_tenant_reads": crossed,
        "resumed_after_restart": _metric(metrics, 'promptserve_background{state="resumed"}'),
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
