import numpy as np

from promptserve.cache.approx import ApproxCache, audit
from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.latents import FOLDER_BYTES, allocated
from promptserve.cache.thresholds import shipped_thresholds

EMB = HashingEmbedder()
CLIP = shipped_thresholds("clip")


def latents(seed, levels=(5, 10, 25)):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((4, 8, 8)).astype(np.float32) for k in levels}


def vec(text):
    return EMB.embed([text])[0]


def test_insert_lookup_and_reopen_after_restart(tmp_path):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    stored = latents(0)
    entry = cache.insert(
        "alice", "a red fox in the snow", vec("a red fox in the snow"), stored, 1.0
    )
    cache.record_hit(entry.id, 25, 2.0)
    cache.close()
    again = ApproxCache(tmp_path, EMB.dim, CLIP)
    hit = again.lookup("alice", vec("a red fox in the snow"))
    assert hit is not None and hit.k_opt == 25 and hit.entry.prompt == "a red fox in the snow"
    assert hit.entry.hits == 1 and hit.entry.score == 0.5
    assert np.array_equal(again.latent(hit.entry, 10), stored[10])
    assert again.lookup("bob", vec("a red fox in the snow")) is None  # tenants do not share


def test_a_corrupt_latent_drops_its_entry(tmp_path):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    entry = cache.insert("t", "castle", vec("castle"), latents(1), 0.0)
    path = cache.store.path(entry.latent_keys[5])
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.latent(entry, 5) is None
    assert cache.lookup("t", vec("castle")) is None
    cache.close()
    assert ApproxCache(tmp_path, EMB.dim, CLIP).lookup("t", vec("castle")) is None


def test_byte_quota_evicts_by_lcbfu_and_deletes_files(tmp_path):
    one = ApproxCache(tmp_path / "probe", EMB.dim, CLIP)
    one.insert("t", "x", vec("x"), latents(9), 0.0)
    size = one.bytes_used() - FOLDER_BYTES  # one entry's files; the folder is the tenant's
    quota = int(size * 2.5) + FOLDER_BYTES
    cache = ApproxCache(tmp_path / "c", EMB.dim, CLIP, quota_bytes=quota)
    a = cache.insert("t", "a lighthouse", vec("a lighthouse"), latents(2), 0.0)
    b = cache.insert("t", "a dragon", vec("a dragon"), latents(3), 1.0)
    cache.record_hit(a.id, 25, 2.0)
    cache.insert("t", "a robot", vec("a robot"), latents(4), 3.0)
    assert cache.bytes_used() <= quota
    prompts = {e.prompt for e in cache.index}
    assert "a lighthouse" in prompts and "a dragon" not in prompts
    assert not any(cache.store.path(k).exists() for k in b.latent_keys.values())


def test_orphan_files_from_a_crash_are_removed_on_open(tmp_path):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    cache.insert("t", "kept", vec("kept"), latents(5), 0.0)
    cache.store.put("0123456789abcdef/000000000099-k05", np.zeros(3, np.float32))  # no manifest row
    cache.close()
    again = ApproxCache(tmp_path, EMB.dim, CLIP)
    assert again.store.stats.orphans_removed == 1
    assert len(again.index) == 1


def test_a_failed_write_skips_the_entry_and_answers_go_on(tmp_path, monkeypatch):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)

    def full_disk(key, latent):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.store, "put", full_disk)
    assert cache.insert("t", "p", vec("p"), latents(6), 0.0) is None
    assert cache.insert("t", "q", vec("q"), latents(7), 0.0) is None
    assert cache.skipped_writes == 2 and len(cache.index) == 0


def test_a_resumed_entry_takes_its_neighbours_lower_levels_and_outlives_it(tmp_path):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    full = latents(6, levels=(5, 10, 15, 20, 25))
    a = cache.insert("t", "a red fox", vec("a red fox"), full, 0.0)
    own = latents(7, levels=(15, 20, 25))  # resumed at 15: nothing of its own below
    b = cache.insert("t", "a red fox, dusk", vec("a red fox, dusk"), own, 1.0, resumed_from=a)
    assert sorted(b.latent_keys) == [5, 10, 15, 20, 25]
    assert cache.holds_every(b, (0, 5, 10, 15, 20, 25)) and not cache.holds_every(b, (30,))
    assert np.array_equal(cache.latent(b, 5), full[5])  # the neighbour stands in below 15
    assert np.array_equal(cache.latent(b, 15), own[15])  # its own from 15 on
    files = cache.bytes_used()
    assert (
        files
        == cache.store.bytes_used()
        == 8 * allocated(cache.store.path(a.latent_keys[5]).stat()) + FOLDER_BYTES
    )
    cache.drop(a.id)  # the neighbour goes: what the entry took from it stays, across a restart
    cache.close()
    assert audit(tmp_path) == {"rows": 1, "files": 5, "orphans": 0, "dangling": 0}
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    b = cache.lookup("t", vec("a red fox, dusk")).entry
    assert np.array_equal(cache.latent(b, 10), full[10])
    assert (
        cache.bytes_used()
        == cache.store.bytes_used()
        == (files - FOLDER_BYTES) * 5 // 8 + FOLDER_BYTES
    )
    cache.drop(b.id)
    assert cache.bytes_used() == 0 and cache.store.keys() == set()


def test_an_entry_takes_only_what_its_neighbour_still_has(tmp_path):
    cache = ApproxCache(tmp_path, EMB.dim, CLIP)
    a = cache.insert("t", "a castle", vec("a castle"), latents(8, (5, 10, 15)), 0.0)
    cache.store.delete(a.latent_keys[5])  # lost under the cache
    b = cache.insert("t", "a castle at noon", vec("a castle"), latents(9, (15,)), 1.0, a)
    assert sorted(b.latent_keys) == [10, 15]
    assert not cache.holds_every(b, (5, 10, 15))


def test_a_group_commits_its_entries_hits_and_files_together(tmp_path, monkeypatch):
    """One group: one manifest commit and one fsync per folder, not one of each per file; the
    next groups inside the durability window commit without a folder fsync."""
    import promptserve.cache.latents as latents_mod

    now = [0.0]
    cache = ApproxCache(tmp_path, EMB.dim, CLIP, sync_window_s=1.0, clock=lambda: now[0])
    first = cache.insert("t", "a lighthouse", vec("a lighthouse"), latents(1), 0.0)
    synced: list = []
    monkeypatch.setattr(latents_mod, "_fsync_dir", synced.append)
    commits = []
    real_commit = cache._db.commit

    class Spy:  # sqlite3.Connection's methods cannot be patched on the instance
        def __getattr__(self, name):
            return getattr(db, name)

        def commit(self):
            commits.append(1)
            real_commit()

        def __enter__(self):
            return db.__enter__()

        def __exit__(self, *exc):
            commits.append(1)
            return db.__exit__(*exc)

    db, cache._db = cache._db, Spy()
    with cache.group():
        for i in range(5):
            cache.insert("t", f"a ship {i}", vec(f"a ship {i}"), latents(10 + i), 1.0)
        cache.record_hit(first.id, 25, 2.0)
        assert commits == [] and synced == []  # nothing durable before the group ends
    assert len(commits) == 1
    assert len(synced) == len(set(synced)) == 1  # one tenant folder, synced once
    now[0] = 0.5  # inside the window: committed, the folder's fsync waits
    with cache.group():
        cache.insert("t", "a ship 5", vec("a ship 5"), latents(20), 3.0)
    assert len(commits) == 2 and len(synced) == 1
    now[0] = 1.0  # the window has passed: the next group's end syncs what waited
    with cache.group():
        cache.insert("u", "a ship 6", vec("a ship 6"), latents(21), 4.0)
    assert len(commits) == 3 and len(synced) == 3  # both tenants' folders
    cache._db = db
    cache.close()
    again = ApproxCache(tmp_path, EMB.dim, CLIP)
    assert len(again.index) == 8 and again.index.get(first.id).hits == 1


def test_a_kill_inside_a_group_leaves_only_orphans_the_next_open_removes(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from promptserve.cache.approx import ApproxCache
        from promptserve.cache.embed import HashingEmbedder
        from promptserve.cache.thresholds import shipped_thresholds
        emb = HashingEmbedder()
        cache = ApproxCache({str(tmp_path)!r}, emb.dim, shipped_thresholds("clip"))
        lat = {{k: np.ones((4, 8, 8), np.float32) for k in (5, 10, 25)}}
        cache.insert("t", "kept", emb.embed(["kept"])[0], lat, 0.0)
        with cache.group():
            for i in range(3):
                cache.insert("t", f"lost {{i}}", emb.embed([f"lost {{i}}"])[0], lat, 1.0)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    again = ApproxCache(tmp_path, EMB.dim, CLIP)
    assert [e.prompt for e in again.index] == ["kept"]
    assert again.store.stats.orphans_removed == 9  # the group's 3 entries x 3 levels
    assert again.latent(next(iter(again.index)), 10) is not None
    report = audit(tmp_path)
    assert report["rows"] == 1 and report["orphans"] == 0 and report["dangling"] == 0, report
