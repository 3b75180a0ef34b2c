"""The approximate cache as a server uses it: the index, the latent files and a manifest.

Order of a write: latent files (each atomic), then the manifest row (one SQLite transaction),
then the in-memory index. A crash before the row leaves orphan files, removed when the cache
reopens; a crash after it leaves a whole entry. On open, rows whose files are missing are
dropped and the index is rebuilt from the rest, so the cache survives restarts. A latent that
fails its checksum when read drops its entry. A failed write (a full disk) skips the entry, is
counted, and is logged once.

Writes come in groups (``group``: the answered runs the cache thread takes in one trip): one
SQLite transaction for the group, committed at its end, files before rows. Inside a group the
index takes each entry once its files are written, so a lookup (on its own thread) may find
it before the commit; a crash before the group's commit loses the group's entries and leaves
orphan files, as a crash before one row did.

Durability: a killed process loses no committed group (the page cache holds the files, the
write-ahead log the rows). A power loss may lose what was written in the last
``sync_window_s`` (default 1 s): grouped files are not fsynced (their checksums stand in) and
their folders are fsynced at most once a window, at the end of the first group after it
elapses, and at ``close``. What it loses is never served torn: a garbled file fails its
checksum and a row naming a file that did not survive is dropped at the next open; a cache
entry is only ever a head start, so losing it costs a recomputation, not an answer.

A byte quota evicts by the index's policy (LCBFU) right after each commit, so the latent files
never exceed the quota by more than the entry just written. Order of an eviction: the index
entry, then the manifest row (committed), then the files. A crash part-way leaves files no
row names, which the next open removes; no row ever names files that are gone (other than
ones lost under it, which the open also drops). An entry a run is reading (pinned) is passed
over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptserve.cache.index import CacheEntry, CacheIndex, EvictionPolicy, latent_key
from promptserve.cache.latents import FOLDER_BYTES, LatentStore, disk_bytes
from promptserve.cache.thresholds import Thresholds

log = logging.getLogger(__name__)

SYNC_WINDOW_S = 1.0  # at most one folder fsync a second for grouped writes (see above)


@dataclass(frozen=True)
class CacheHit:
    entry: CacheEntry
    similarity: float
    k_opt: int  # the largest level the similarity tolerates (0: none)


class ApproxCache:
    def __init__(
        self,
        root: str | Path,
        dim: int,
        thresholds: Thresholds,
        capacity: int = 100_000,
        quota_bytes: int | None = None,
        eviction: EvictionPolicy = "lcbfu",
        total_steps: int = 50,
        sync_window_s: float = SYNC_WINDOW_S,
        clock=time.monotonic,  # noqa: ANN001 - when the window last closed
    ) -> None:
        self.root = Path(root)
        self.sync_window_s, self._clock = sync_window_s, clock
        self._synced_at = -float("inf")
        self.root.mkdir(parents=True, exist_ok=True)
        self.thresholds = thresholds
        self.quota_bytes = quota_bytes
        self.store = LatentStore(self.latents_dir(self.root))
        self.index = CacheIndex(dim, capacity, total_steps, eviction)
        # lookups run on a thread of their own, beside the writer's: the in-memory index is
        # the one thing both touch, under this lock, held for no file or SQLite work
        self._lock = threading.RLock()
        self.skipped_writes = 0
        self.evictions = 0
        self.evicted_bytes = 0
        # fault injection for the reliability soak: SIGKILL this process part-way through an
        # eviction, the first from the Nth on of an entry with several files (its row gone,
        # one of its files deleted, the rest not)
        self._kill_in_eviction = int(os.environ.get("PROMPTSERVE_FAULT_KILL_IN_EVICTION", "0"))
        # built on one thread, used from the server's event loop thread: one connection, in turn
        self._db = sqlite3.connect(str(self.root / "manifest.sqlite"), check_same_thread=False)
        # a write-ahead log synced at checkpoints: a killed process loses no commit; a power
        # loss may lose the last ones, whose files the next open then removes as orphans
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, tenant TEXT, prompt TEXT,"
            " levels TEXT, embedding BLOB, inserted_s REAL, hits INTEGER, score REAL)"
        )
        self._bytes = 0
        self._grouped = False
        self._reopen()

    @contextmanager
    def group(self) -> Iterator[None]:
        """Writes, hits and evictions inside commit together at its end (see the module
        docstring): one commit for many entries, and folder fsyncs at most once a window."""
        if self._grouped:
            yield
            return
        self._grouped = True
        self.store.defer_dir_syncs(True)
        try:
            yield
        finally:
            self._grouped = False
            try:
                self._flush()
            finally:
                self.store.defer_dir_syncs(False)

    def _flush(self) -> None:
        """The group's commit; the folders' fsync once the durability window has passed."""
        now = self._clock()
        if now - self._synced_at >= self.sync_window_s:
            self.store.sync_dirs()  # the files named durably before the rows that name them
            self._synced_at = now
        self._db.commit()

    def _tx(self) -> AbstractContextManager:
        """One statement's transaction, or the group's (committed at its end)."""
        return nullcontext() if self._grouped else self._db

    @staticmethod
    def latents_dir(root: str | Path) -> Path:
        return Path(root) / "latents"

    def lookup(self, tenant: str, embedding: np.ndarray) -> CacheHit | None:
        """The tenant's nearest entry; safe beside the writer's thread. An entry is indexed
        once its files are written (its manifest row may still be in the writer's group), so
        a hit is always readable unless evicted meanwhile, which a read reports as absent."""
        with self._lock:
            match = self.index.nearest(tenant, embedding)
        if match is None:
            return None
        return CacheHit(match.entry, match.similarity, self.thresholds.k_opt(match.similarity))

    def latent(self, entry: CacheEntry, k: int) -> np.ndarray | None:
        """The entry's level-K latent; a corrupt or missing file drops the whole entry."""
        key = entry.latent_keys.get(k)
        latent = self.store.get(key) if key else None
        if latent is None and key is not None:
            self.drop(entry.id)
        return latent

    def insert(
        self,
        tenant: str,
        prompt: str,
        embedding: np.ndarray,
        latents: dict[int, np.ndarray],
        now_s: float,
        resumed_from: CacheEntry | None = None,
    ) -> CacheEntry | None:
        """Write and index an entry; a run that resumed from ``resumed_from`` at its lowest
        level in ``latents`` also takes that neighbour's levels below it (``commit``)."""
        if not latents:
            return None
        with self._lock:
            entry_id = self.index.reserve_id()
        try:
            written = write_latents(self.store, tenant, entry_id, latents)
        except OSError as exc:
            self.skip_write(exc)
            return None
        return self.commit(tenant, prompt, embedding, entry_id, written, now_s, resumed_from)

    def reserve(self) -> int:
        """An entry id for latents another process writes (a worker on the shared store)."""
        with self._lock:
            return self.index.reserve_id()

    def commit(
        self,
        tenant: str,
        prompt: str,
        embedding: np.ndarray,
        entry_id: int,
        written: dict[int, int],
        now_s: float,
        resumed_from: CacheEntry | None = None,
    ) -> CacheEntry | None:
        """Index an entry whose latent files are written (``written``: K -> bytes).

        A run resumed at K holds no latents of its own below K. The neighbour it started from
        stands for it at K, and so at the levels below K too: those files are linked into the
        entry, so that every entry holds every level, as the policy's ``k_max`` assumes (a
        request routed below a level its neighbour lacks would run from noise inside a batch
        planned for a resumed run, and overrun it)."""
        if not written:
            return None
        if resumed_from is not None:
            written = self._inherit(tenant, entry_id, resumed_from, min(written)) | written
        levels = tuple(sorted(written))
        with self._tx():
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, 0, 0.0)",
                (
                    entry_id,
                    tenant,
                    prompt,
                    json.dumps(levels),
                    np.asarray(embedding, np.float32).tobytes(),
                    now_s,
                ),
            )
        with self._lock:
            result = self.index.insert(tenant, prompt, embedding, levels, now_s, entry_id=entry_id)
            self.index.pin(result.entry.id)  # the entry just written is never its own victim
            opened = self.index.entries_in(tenant) == 1  # its namespace's folder is new
        self._bytes += sum(written.values()) + (FOLDER_BYTES if opened else 0)
        try:
            for gone in result.evicted:
                self._forget(gone, evicted=True)
            while self.quota_bytes is not None and self._bytes > self.quota_bytes:
                with self._lock:
                    victims = self.index.evict(1)
                if not victims:
                    break  # every other entry is pinned: over quota until a run lets go
                for gone in victims:
                    self._forget(gone, evicted=True)
        finally:
            self.unpin(result.entry.id)
        return result.entry

    def _inherit(
        self, tenant: str, entry_id: int, source: CacheEntry, below: int
    ) -> dict[int, int]:
        """Link ``source``'s files below level ``below`` into the new entry: K -> bytes. A file
        gone meanwhile (evicted, dropped) is left out, and the entry holds fewer levels."""
        linked: dict[int, int] = {}
        for k, key in source.latent_keys.items():
            if k >= below:
                continue
            try:
                linked[k] = self.store.link(key, latent_key(tenant, entry_id, k))
            except OSError:
                continue
        return linked

    def holds_every(self, entry: CacheEntry, levels: Sequence[int]) -> bool:
        """Whether ``entry`` can start a run at each of ``levels`` above 0."""
        return all(k in entry.latent_keys for k in levels if k > 0)

    def pin(self, entry_id: int) -> None:
        """A worker is about to read this entry's files: not evicted until ``unpin``."""
        with self._lock:
            self.index.pin(entry_id)

    def unpin(self, entry_id: int) -> None:
        with self._lock:
            self.index.unpin(entry_id)

    def stats(self) -> dict[str, int | None]:
        return {
            "bytes": self._bytes,
            "entries": len(self.index),
            "quota_bytes": self.quota_bytes,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
        }

    def skip_write(self, reason: object) -> None:
        """A write that failed (a full disk): counted, and logged the first time only."""
        if self.skipped_writes == 0:
            log.error("latent cache write failed, entries are skipped until it works: %s", reason)
        self.skipped_writes += 1

    def record_hit(self, entry_id: int, k: int, now_s: float) -> None:
        with self._lock:
            self.index.record_hit(entry_id, k, now_s)
            entry = self.index.get(entry_id)
        if entry is not None:
            with self._tx():
                self._db.execute(
                    "UPDATE entries SET hits = ?, score = ? WHERE id = ?",
                    (entry.hits, entry.score, entry_id),
                )

    def bytes_used(self) -> int:
        return self._bytes

    def sync(self) -> None:
        """What the window still holds, durable now (a server stopping)."""
        self.store.sync_dirs()
        self._db.commit()
        self._synced_at = self._clock()

    def close(self) -> None:
        self.sync()
        self._db.close()

    def drop(self, entry_id: int) -> None:
        """Forget an entry and its files (a latent found missing or corrupt)."""
        with self._lock:
            entry = self.index.remove(entry_id)
        if entry is not None:
            self._forget(entry)

    def _forget(self, entry: CacheEntry, evicted: bool = False) -> None:
        """Its manifest row, then its files (see the module docstring for why this order)."""
        with self._tx():
            self._db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        if self._grouped:
            self._db.commit()  # the row is gone for good before any of its files
        if evicted:
            self.evictions += 1
        freed = 0
        keys = list(entry.latent_keys.values())
        for n, key in enumerate(keys):
            if n == 1 and evicted and 0 < self._kill_in_eviction <= self.evictions:
                os.kill(os.getpid(), signal.SIGKILL)  # the first eviction from the Nth on
                # that has a second file: one file deleted, the rest not
            freed += self.store.delete_freeing(key)
        with self._lock:
            emptied = self.index.entries_in(entry.tenant) == 0
        if emptied:  # the namespace's last entry: its folder goes too (and its quota share)
            self.store.remove_folder(keys[0].partition("/")[0])  # its keys' folder
            freed += FOLDER_BYTES
        self._bytes -= freed
        if evicted:
            self.evicted_bytes += freed

    def _reopen(self) -> None:
        on_disk = self.store.keys()
        rows = self._db.execute(
            "SELECT id, tenant, prompt, levels, embedding, inserted_s, hits, score FROM entries ORDER BY id"
        ).fetchall()
        known: set[str] = set()
        for entry_id, tenant, prompt, levels_json, blob, inserted_s, hits, score in rows:
            levels = tuple(json.loads(levels_json))
            keys = {latent_key(tenant, entry_id, k) for k in levels}
            if not keys <= on_disk:
                with self._db:
                    self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                continue
            vec = np.frombuffer(blob, dtype=np.float32)
            self.index.insert(
                tenant, prompt, vec, levels, inserted_s, entry_id=entry_id, hits=hits, score=score
            )
            known |= keys
        self.store.remove_orphans(known)
        self.store.remove_empty_folders()
        self._bytes = disk_bytes(self.store.path(k) for k in known)
        self._bytes += FOLDER_BYTES * self.index.namespaces


def write_latents(
    store: LatentStore, tenant: str, entry_id: int, latents: dict[int, np.ndarray]
) -> dict[int, int]:
    """Write one entry's latent files (each atomic): K -> bytes. A failed write (OSError) leaves
    none of the entry's files behind."""
    written: dict[int, int] = {}
    try:
        for k, latent in latents.items():
            written[k] = store.put(latent_key(tenant, entry_id, k), latent)
    except OSError:
        for k in latents:
            store.delete(latent_key(tenant, entry_id, k))
        raise
    return written


def audit(root: str | Path) -> dict[str, int]:
    """What is on disk against what the manifest names, read as they are (nothing repaired):
    ``orphans``, latent files no row names; ``dangling``, rows naming a file that is gone."""
    root = Path(root)
    on_disk = LatentStore(ApproxCache.latents_dir(root), clean_temporaries=False).keys()
    db = sqlite3.connect(str(root / "manifest.sqlite"))
    try:
        rows = db.execute("SELECT id, tenant, levels FROM entries").fetchall()
    except sqlite3.OperationalError:  # killed before the manifest had its table: no rows
        rows = []
    finally:
        db.close()
    named: set[str] = set()
    dangling = 0
    for entry_id, tenant, levels_json in rows:
        keys = {latent_key(tenant, entry_id, k) for k in json.loads(levels_json)}
        dangling += int(not keys <= on_disk)
        named |= keys
    return {"rows": len(rows), "files": len(on_disk), "orphans": len(on_disk - named),
            "dangling": dangling}  # fmt: skip
