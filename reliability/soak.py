"""A cache that stays within its disk: thousands of distinct prompts against a quota that holds
about 1% of what they write, the latent folder's size sampled all along, then a SIGKILL part-way
through an eviction and a restart, with an audit of files against the manifest after each.

The server runs on the modelled backend, which writes small stand-in latents (real keys,
levels and checksummed files), so the cache does everything it does under a real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx

from promptserve.cache.approx import ApproxCache, audit
from promptserve.cache.latents import allocated, disk_bytes
from promptserve.loadgen import read_metric
from promptserve.server import cache_root
from reliability.server import start_server, stop

ROOT = Path(__file__).resolve().parents[1]
QUOTA = 480 * 1024  # bytes of latent files and folders on the disk: about 1% of what they write
ARGS = ["--backend", "modeled", "--model", "sdxl-reference", "--embedder", "hashing",
        "--workers", "4", "--speedup", "50", "--slo", "600",
        "--cache-max-bytes", str(QUOTA)]  # fmt: skip
ENTRY = re.compile(r"^(\d+)-k\d+\.safetensors$")


def folder_bytes(folder: Path) -> int:
    """What the folder's files take on the disk (an entry's levels linked from its neighbour
    share their data: counted once)."""
    return disk_bytes(p for p in folder.rglob("*") if not p.is_dir())


def largest_entry(folder: Path) -> int:
    """The bytes of the largest entry on disk (its files share the entry id)."""
    sizes: dict[tuple[str, str], int] = {}
    for path in folder.rglob("*.safetensors"):
        m = ENTRY.match(path.name)
        if m:
            key = (path.parent.name, m.group(1))
            with contextlib.suppress(FileNotFoundError):  # evicted since the listing
                sizes[key] = sizes.get(key, 0) + allocated(path.stat())
    return max(sizes.values(), default=0)


class Sampler(threading.Thread):
    """The latent folder's size every ``every_s`` (4x a second), and the largest entry seen."""

    def __init__(self, folder: Path, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.folder, self.every_s = folder, every_s
        self.peak = self.samples = self.entry = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            self.entry = max(self.entry, largest_entry(self.folder))
            self.samples += 1
            self.halt.wait(self.every_s)


async def send(url: str, prompts: list[str], concurrency: int = 24, stop_when=None) -> dict:
    """Every prompt once, ``concurrency`` at a time; counts by status. ``stop_when()`` true
    ends the run early (the server was killed)."""
    counts: dict[str, int] = {}
    queue = list(reversed(prompts))
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while queue and not (stop_when and stop_when()):
                prompt = queue.pop()
                try:
                    r = await client.post(f"{url}/v1/images/generations", json={"prompt": prompt})
                    key = str(r.status_code)
                except httpx.HTTPError:
                    key = "no answer"
                counts[key] = counts.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def run(count: int = 2000) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="soak-"))
    latents = ApproxCache.latents_dir(cache_root(cache))
    lines = (ROOT / "data/diffusiondb_prompts_4k.txt").read_text().splitlines()
    prompts = list(dict.fromkeys(p.strip() for p in lines if p.strip()))[:count]
    proc, url = start_server(ARGS, cache)
    sampler = Sampler(latents)
    sampler.start()
    started = time.monotonic()
    try:
        counts = asyncio.run(send(url, prompts))
        sampler.halt.set()
        sampler.join()
        metric = {
            name: read_metric(url, f"promptserve_{name}")
            for name in ("cache_hit_ratio", "cache_evictions", "cache_evicted_bytes",
                         "cache_bytes", "cache_entries", "cache_quota_bytes")
        }  # fmt: skip
    finally:
        sampler.halt.set()
        stop(proc)
    soak_s = time.monotonic() - started
    entry = max(sampler.entry, largest_entry(latents))
    report = {
        "prompts": len(prompts),
        "answers": counts,
        "quota_bytes": QUOTA,
        "needed_bytes_estimate": len(prompts) * entry,
        "largest_entry_bytes": entry,
        "disk_samples": sampler.samples,
        "peak_bytes": sampler.peak,
        "peak_over_quota_bytes": max(0, sampler.peak - QUOTA),
        "within_quota_plus_one_entry": sampler.peak <= QUOTA + entry,
        "evictions": int(metric["cache_evictions"]),
        "evicted_bytes": int(metric["cache_evicted_bytes"]),
        "end_hit_ratio": round(metric["cache_hit_ratio"], 4),
        "end_entries": int(metric["cache_entries"]),
        "soak_seconds": round(soak_s, 1),
    }
    report["kill"] = kill_and_restart(cache, [f"{p} (second pass)" for p in prompts[:400]])
    return report


def kill_and_restart(cache: Path, prompts: list[str]) -> dict:
    """SIGKILL the server part-way through an eviction (from its 5th on: its manifest row
    deleted, one of its files deleted, the rest not), audit the folder as the kill left it, restart the server
    on it, audit again."""
    proc, url = start_server(ARGS, cache, env={"PROMPTSERVE_FAULT_KILL_IN_EVICTION": "5"})
    try:
        asyncio.run(send(url, prompts, concurrency=8, stop_when=lambda: proc.poll() is not None))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            stop(proc)
    killed = proc.returncode == -9
    as_left = audit(cache_root(cache))
    proc, url = start_server(ARGS, cache)  # the restart: the cache reopens and repairs
    try:
        serves = httpx.post(
            f"{url}/v1/images/generations", json={"prompt": prompts[0]}, timeout=120
        ).status_code
    finally:
        stop(proc)
    after = audit(cache_root(cache))
    return {
        "killed_mid_eviction": killed and as_left["orphans"] > 0,
        "as_left": as_left,
        "after_restart": after,
        "served_after_restart": serves == 200,
    }
