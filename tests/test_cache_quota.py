"""The cache within its quota: LCBFU eviction with counters, pins, crash safety part-way
through an eviction, the embedding cache's row bound, and the settings that set them."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from promptserve.cache.approx import ApproxCache, audit
from promptserve.cache.embed import DiskCachedEmbedder, HashingEmbedder
from promptserve.cache.latents import FOLDER_BYTES
from promptserve.config import validate_settings
from promptserve.errors import InputError
from promptserve.server import cache_quota
from test_approx_cache import CLIP, EMB, latents, vec


def entry_bytes(tmp_path) -> int:
    """One entry's files on the disk (its namespace's folder apart)."""
    probe = ApproxCache(tmp_path / "probe", EMB.dim, CLIP)
    probe.insert("t", "x", vec("x"), latents(9), 0.0)
    return probe.bytes_used() - FOLDER_BYTES


def test_files_stay_within_quota_plus_one_entry_and_evictions_are_counted(tmp_path):
    size = entry_bytes(tmp_path)
    quota = size * 4 + FOLDER_BYTES
    cache = ApproxCache(tmp_path / "c", EMB.dim, CLIP, quota_bytes=quota)
    for i in range(30):
        cache.insert("t", f"prompt {i}", vec(f"prompt {i}"), latents(i), float(i))
        on_disk = cache.store.bytes_used()
        assert on_disk == cache.bytes_used() <= quota  # evicted right after each commit
    stats = cache.stats()
    assert stats["entries"] == 4 and stats["evictions"] == 26
    assert stats["evicted_bytes"] == 26 * size and stats["quota_bytes"] == quota
    assert audit(tmp_path / "c") == {"rows": 4, "files": 12, "orphans": 0, "dangling": 0}


def test_a_pinned_entry_is_passed_over_until_unpinned(tmp_path):
    size = entry_bytes(tmp_path)
    cache = ApproxCache(tmp_path / "c", EMB.dim, CLIP, quota_bytes=size * 2 + FOLDER_BYTES)
    first = cache.insert("t", "first", vec("first"), latents(1), 0.0)
    second = cache.insert("t", "second", vec("second"), latents(2), 1.0)
    cache.pin(first.id)  # LCBFU's next victim: no hits, oldest
    cache.insert("t", "third", vec("third"), latents(3), 2.0)
    kept = {e.prompt for e in cache.index}
    assert kept == {"first", "third"} and cache.index.get(second.id) is None
    assert all(cache.store.path(k).exists() for k in first.latent_keys.values())
    cache.pin(cache.lookup("t", vec("third")).entry.id)
    cache.insert("t", "fourth", vec("fourth"), latents(4), 3.0)  # all others pinned: no hang
    assert len(cache.index) == 3 and cache.bytes_used() > size * 2
    cache.unpin(first.id)
    cache.insert("t", "fifth", vec("fifth"), latents(5), 4.0)
    assert cache.index.get(first.id) is None
    assert cache.bytes_used() <= size * 2 + size + FOLDER_BYTES


def test_a_kill_part_way_through_an_eviction_leaves_nothing_a_restart_keeps(tmp_path):
    root = tmp_path / "c"
    size = entry_bytes(tmp_path)
    child = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        from test_approx_cache import CLIP, EMB, latents, vec
        from promptserve.cache.approx import ApproxCache
        cache = ApproxCache({str(root)!r}, EMB.dim, CLIP, quota_bytes={size * 3 + FOLDER_BYTES})
        for i in range(50):
            cache.insert("t", f"p {{i}}", vec(f"p {{i}}"), latents(i), float(i))
        print("never killed")
    """)
    env = {**os.environ, "PROMPTSERVE_FAULT_KILL_IN_EVICTION": "4"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    torn = audit(root)
    assert torn["orphans"] >= 1 and torn["dangling"] == 0  # its row went first, then one file
    reopened = ApproxCache(root, EMB.dim, CLIP, quota_bytes=size * 3 + FOLDER_BYTES)
    assert reopened.store.stats.orphans_removed == torn["orphans"]
    after = audit(root)
    assert after["orphans"] == 0 and after["dangling"] == 0
    assert after["rows"] == len(reopened.index) == 3
    assert reopened.lookup("t", vec("p 6")) is not None  # the newest entries are whole


class Counting(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def embed(self, prompts):
        self.calls += len(prompts)
        return super().embed(prompts)


def test_the_embedding_cache_keeps_its_newest_rows_within_the_bound(tmp_path):
    inner = Counting()
    emb = DiskCachedEmbedder(inner, tmp_path / "e.sqlite", max_rows=5)
    emb.embed([f"prompt {i}" for i in range(12)])
    assert emb.rows == 5 and emb.evicted_rows == 7
    emb.embed([f"prompt {i}" for i in range(7, 12)])  # the newest five: no new embedding
    assert inner.calls == 12
    emb.embed(["prompt 0"])  # gone, embedded again
    assert inner.calls == 13
    emb.close()
    again = DiskCachedEmbedder(Counting(), tmp_path / "e.sqlite", max_rows=3)
    assert again.rows == 3 and again.evicted_rows == 2  # a smaller bound applies at open


def test_the_quota_setting_takes_units_and_names_a_bad_value(tmp_path, caplog):
    assert int(validate_settings({"cache_max_bytes": "20GiB"}, "f").cache_max_bytes) == 20 << 30
    assert int(validate_settings({"cache_max_bytes": 4096}, "f").cache_max_bytes) == 4096
    for bad in ("lots", 0, "-1GB"):
        with pytest.raises(InputError, match="field cache_max_bytes"):
            validate_settings({"cache_max_bytes": bad}, "f")
    with pytest.raises(InputError, match="field embed_cache_max_rows"):
        validate_settings({"embed_cache_max_rows": 0}, "f")
    with caplog.at_level(logging.INFO, logger="promptserve.server"):
        assert cache_quota(12345, tmp_path) == 12345
        default = cache_quota(None, tmp_path)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert 0.09 * free <= default <= 0.11 * free + (1 << 20)
    assert "10% of the" in caplog.text and "free at start" in caplog.text


def test_metrics_show_the_cache_against_its_quota(tmp_path):
    QUOTA = 60_000  # a few entries of the modelled engine's stand-in latents, blocks counted

    import httpx

    from factories import client, modeled_app, until_cached
    from promptserve.loadgen import read_metric
    from promptserve.server.live import LiveServer

    app = modeled_app(tmp_path, cache_max_bytes=QUOTA, embed_cache_max_rows=50, speedup=50.0)

    def cache_bytes(url):
        return read_metric(url, "promptserve_cache_bytes")

    with LiveServer(app) as url:
        images = client(url).images
        images.generate(prompt="a distinct prompt number 0", size="1024x1024")
        until_cached(url, 1)  # its commit runs on the cache thread after the answer
        first_entry = cache_bytes(url)  # a whole entry: nothing to link to, nothing evicted
        for i in range(1, 12):
            images.generate(prompt=f"a distinct prompt number {i}", size="1024x1024")
        text = httpx.get(f"{url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("promptserve_cache_") or line.startswith("promptserve_embedding")
    }
    assert values["promptserve_cache_quota_bytes"] == QUOTA
    assert values["promptserve_cache_evictions"] > 0 and values["promptserve_cache_entries"] > 0
    assert values["promptserve_cache_evicted_bytes"] > 0
    # the last answer's commit may be between its write and its eviction when /metrics reads,
    # so the bound is quota + one entry: a whole one (an entry whose levels link to its
    # neighbour's counts less, so the mean evicted entry is no bound)
    assert 0 < first_entry <= QUOTA
    assert 0 < values["promptserve_cache_bytes"] <= QUOTA + first_entry
    assert values["promptserve_embedding_cache_rows"] == 12
    assert np.isfinite(values["promptserve_cache_hit_ratio"])


def test_a_namespace_flood_stays_within_the_quota_and_leaves_no_folder_behind(tmp_path):
    """One tenant, a new look per request (a negative prompt each): every namespace's folder
    counts against the quota, and a namespace whose last entry goes takes its folder and its
    vectors with it, now and across a restart."""
    size = entry_bytes(tmp_path)
    quota = 4 * (size + FOLDER_BYTES)
    root = tmp_path / "c"
    cache = ApproxCache(root, EMB.dim, CLIP, quota_bytes=quota)
    for i in range(60):
        space = f"t\x1flook:{i:016x}:None:None:()"
        cache.insert(space, "a fox", vec("a fox"), latents(i), float(i))
        assert cache.bytes_used() == cache.store.bytes_used() <= quota
    folders = [f for f in cache.store.root.iterdir() if f.is_dir()]
    assert len(folders) == cache.index.namespaces == len(cache.index) == 4
    assert all(any(f.iterdir()) for f in folders)  # no empty folder left
    cache.close()
    reopened = ApproxCache(root, EMB.dim, CLIP, quota_bytes=quota)
    assert reopened.bytes_used() == reopened.store.bytes_used() <= quota
    assert reopened.index.namespaces == 4


def test_guidance_and_adapter_scales_are_served_at_a_hundredth():
    from promptserve.cache.spaces import cache_space
    from promptserve.engine.base import UNET_GUIDANCE

    looks = {UNET_GUIDANCE.look(None, 7.0 + i * 1e-9) for i in range(500)}
    assert len(looks) == 1 and next(iter(looks)).guidance == 7.0
    assert UNET_GUIDANCE.look(None, 7.5004).guidance is None  # the default, spelt out
    assert UNET_GUIDANCE.look(None, 7.26).guidance == 7.26
    lora = UNET_GUIDANCE.look(None, None, lora=(("ink", 0.0000001), ("oil", 0.504)))
    assert lora.lora == (("oil", 0.5),)  # a scale that rounds to 0 adds nothing
    assert cache_space("t", UNET_GUIDANCE.look(None, 7.0)) == cache_space(
        "t", UNET_GUIDANCE.look(None, 7.0 + 1e-9)
    )
