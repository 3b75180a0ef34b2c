"""API keys, tenant isolation under load, and hostile image ids."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx

from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer

KEYS = {"key-tenant-a-0123456789": "tenant-a", "key-tenant-b-0123456789": "tenant-b"}
HOSTILE_IDS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "....//....//etc/passwd",
    "0" * 31 + "/",
    "a" * 10_000,
    "%00" * 16,
    "0123456789abcdef0123456789abcdef/../../manifest.sqlite",
]


async def _generate(client: httpx.AsyncClient, url: str, key: str, prompt: str) -> dict | None:
    r = await client.post(
        f"{url}/v1/images/generations",
        json={"prompt": prompt},
        headers={"authorization": f"Bearer {key}"},
    )
    return r.json()["data"][0]["promptserve"] if r.status_code == 200 else None


async def _isolation(url: str, prompts: list[str]) -> dict:
    a, b = list(KEYS)
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(_generate(client, url, a, p) for p in prompts))  # A's cache
        again_a, first_b = await asyncio.gather(  # then both at once, the same prompts
            asyncio.gather(*(_generate(client, url, a, p) for p in prompts)),
            asyncio.gather(*(_generate(client, url, b, p) for p in prompts)),
        )
    return {
        "tenant_a_hits_on_own_cache": sum(1 for m in again_a if m and m["similarity"]),
        "tenant_b_answers": sum(1 for m in first_b if m),
        "cross_tenant_hits": sum(1 for m in first_b if m and m["similarity"] is not None),
    }


def run(prompts: int = 12) -> dict:
    # the tiny engine: it makes real latents, so the cache fills and can be hit
    cfg = ServerConfig(
        model="tiny",
        embedder="hashing",
        cache_dir=Path(tempfile.mkdtemp()),
        slo_s=300,
        workers=2,
        api_keys=KEYS,
    )
    with LiveServer(build_app(cfg)) as url:
        body = {"prompt": "a quiet harbour"}
        gen = f"{url}/v1/images/generations"
        keys = {
            "no_key": httpx.post(gen, json=body).status_code,
            "wrong_key": httpx.post(
                gen, json=body, headers={"authorization": "Bearer not-a-key-0123456789"}
            ).status_code,
            "good_key": httpx.post(
                gen, json=body, headers={"authorization": f"Bearer {next(iter(KEYS))}"}
            ).status_code,
        }
        isolation = asyncio.run(
            _isolation(url, [f"a red bicycle number {i}" for i in range(prompts)])
        )
        auth = {"authorization": f"Bearer {next(iter(KEYS))}"}
        hostile = [httpx.get(f"{url}/v1/images/{i}", headers=auth).status_code for i in HOSTILE_IDS]
    return {
        "keys": keys,
        "keys_enforced": keys["no_key"] == 401
        and keys["wrong_key"] == 401
        and keys["good_key"] == 200,
        **isolation,
        "hostile_ids": len(HOSTILE_IDS),
        "hostile_ids_served": sum(1 for s in hostile if s == 200),
        "hostile_ids_5xx": sum(1 for s in hostile if s >= 500),
        "hostile_statuses": sorted(set(hostile)),
    }
