"""The durable job store: a job answered 202 is a committed row first (SQLite, synchronous=FULL:
on the disk before the answer goes out), with its request and, for an edit, its input images; a
finished job's view (and a linked image's bytes) is written when it ends, and a job its tenant's
bounds push out is deleted. After a crash and a restart the server reads it back
(``jobroutes.restore_jobs``): unfinished jobs run again, finished ones stay retrievable.

Times in rows are wall-clock seconds (``time.time()``): a restarted server's monotonic clock
starts elsewhere.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptserve.engine.base import EditInput, Paused
from promptserve.server.schemas import ImageRequest
from promptserve.server.webhooks import Delivery

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, deadline REAL NOT NULL, request TEXT NOT NULL, edit BLOB,
    view TEXT, finished REAL)""",
    """CREATE TABLE IF NOT EXISTS job_images (
    job_id TEXT NOT NULL, image_id TEXT NOT NULL, image BLOB NOT NULL, media TEXT NOT NULL,
    PRIMARY KEY (job_id, image_id))""",
    # a background job's image as last written down (paused, or every CHECKPOINT_STEPS): a
    # restart resumes it from there
    # a finished job's webhook, written with its end (``webhooks``): sent until delivered
    """CREATE TABLE IF NOT EXISTS webhooks (
    msg_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, tenant TEXT NOT NULL, url TEXT NOT NULL,
    body BLOB NOT NULL, attempts INTEGER NOT NULL, next_at REAL NOT NULL, status TEXT NOT NULL,
    error TEXT)""",
    # a tenant's webhook signing secret where the keys file gives none (made once, kept)
    """CREATE TABLE IF NOT EXISTS secrets (tenant TEXT PRIMARY KEY, secret TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS job_pauses (
    job_id TEXT NOT NULL, image INTEGER NOT NULL, step INTEGER NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (job_id, image))""",
)
Image = tuple[str, bytes, str]  # a linked result: its image id, bytes and media type


@dataclass(frozen=True)
class StoredJob:
    id: str
    tenant: str
    status: str
    created: float  # wall clock, as every time here
    deadline: float
    request: ImageRequest
    edit: EditInput | None
    view: dict | None  # a finished job's answer to GET /v1/jobs/{id}
    finished: float | None
    images: list[Image]  # its linked results
    pauses: dict[int, Paused] = field(default_factory=dict)  # per image: where it was written


def edit_bytes(edit: EditInput) -> bytes:
    """An edit's input as one ``.npz``: its images, mask and strength."""
    arrays = {"image": edit.image, "strength": np.asarray(edit.strength)}
    if edit.mask is not None:
        arrays["mask"] = edit.mask
    arrays.update({f"more{i}": image for i, image in enumerate(edit.more)})
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def paused_bytes(paused: Paused) -> bytes:
    """A written-down member as one ``.npz``: its latent, dtype and captured levels."""
    arrays = {"latent": paused.latent, "dtype": np.asarray(paused.dtype)}
    arrays.update({f"level{k}": latent for k, latent in paused.captured.items()})
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def paused_of(step: int, data: bytes) -> Paused:
    with np.load(io.BytesIO(data)) as z:
        levels = {int(k[5:]): z[k] for k in z.files if k.startswith("level")}
        return Paused(step, z["latent"], str(z["dtype"]), levels)


def edit_of(data: bytes) -> EditInput:
    with np.load(io.BytesIO(data)) as z:
        more = tuple(z[f"more{i}"] for i in range(sum(k.startswith("more") for k in z.files)))
        mask = z["mask"] if "mask" in z.files else None
        return EditInput(z["image"], float(z["strength"]), mask, more)


class JobStore:
    """One SQLite file; every call commits before it returns. The server calls it from a
    worker thread (``asyncio.to_thread``): one connection, used under a lock."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a 202 stands for a row on the disk
        for table in SCHEMA:
            self._db.execute(table)
        self._db.commit()
        self._lock = threading.Lock()

    def accept(
        self,
        job_id: str,
        tenant: str,
        req: ImageRequest,
        edit: EditInput | None,
        created: float,
        deadline: float,
    ) -> None:
        row = (
            job_id, tenant, "queued", created, deadline, req.model_dump_json(exclude_none=True),
            None if edit is None else edit_bytes(edit),
        )  # fmt: skip
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO jobs (id, tenant, status, created, deadline, request, edit) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def finish(
        self, job_id: str, view: dict, now: float, images: list[Image], hook: Delivery | None = None
    ) -> None:
        """The job's final view, its linked images (their ids, bytes and media types) and its
        webhook's delivery, in one transaction."""
        with self._lock, self._db:
            if hook is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO webhooks VALUES (?, ?, ?, ?, ?, 0, 0, 'pending', NULL)",
                    (hook.msg_id, hook.job_id, hook.tenant, hook.url, hook.body),
                )
            done = self._db.execute(
                "UPDATE jobs SET status = ?, view = ?, finished = ?, edit = NULL WHERE id = ?",
                (view["status"], json.dumps(view), now, job_id),
            )
            if done.rowcount:  # not pushed out meanwhile
                self._db.executemany(
                    "INSERT OR REPLACE INTO job_images VALUES (?, ?, ?, ?)",
                    [(job_id, *image) for image in images],
                )
            self._db.execute("DELETE FROM job_pauses WHERE job_id = ?", (job_id,))

    def deliveries(self) -> list[Delivery]:
        """The webhooks not yet delivered nor given up on."""
        with self._lock:
            rows = self._db.execute(
                "SELECT msg_id, job_id, tenant, url, body, attempts, next_at FROM webhooks "
                "WHERE status = 'pending'"
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def attempted(
        self, msg_id: str, attempts: int, next_at: float, status: str, error: str | None
    ) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE webhooks SET attempts = ?, next_at = ?, status = ?, error = ? "
                "WHERE msg_id = ?",
                (attempts, next_at, status, error, msg_id),
            )

    def secret(self, tenant: str, make: Callable[[], str]) -> tuple[str, bool]:
        """The tenant's kept signing secret, made now if it has none (True: made now)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT secret FROM secrets WHERE tenant = ?", (tenant,))
            found = row.fetchone()
            if found is not None:
                return found[0], False
            secret = make()
            self._db.execute("INSERT INTO secrets VALUES (?, ?)", (tenant, secret))
            return secret, True

    def keep_pause(self, job_id: str, image: int, paused: Paused) -> None:
        """Image ``image`` of a running job, written down at ``paused.step`` (a later write
        replaces it; none once the job has ended or was deleted)."""
        with self._lock, self._db:
            alive = self._db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND view IS NULL", (job_id,)
            ).fetchone()
            if alive:
                self._db.execute(
                    "INSERT OR REPLACE INTO job_pauses VALUES (?, ?, ?, ?)",
                    (job_id, image, paused.step, paused_bytes(paused)),
                )

    def forget(self, job_ids: list[str]) -> None:
        """Jobs no longer kept (their tenant's bounds, their age, refused before queued)."""
        if job_ids:
            rows = [(i,) for i in job_ids]
            with self._lock, self._db:
                self._db.executemany("DELETE FROM jobs WHERE id = ?", rows)
                self._db.executemany("DELETE FROM job_images WHERE job_id = ?", rows)
                self._db.executemany("DELETE FROM job_pauses WHERE job_id = ?", rows)

    def load(self) -> list[StoredJob]:
        """Every row, oldest first, with its linked images."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, status, created, deadline, request, edit, view, finished "
                "FROM jobs ORDER BY created"
            ).fetchall()
            images: dict[str, list[Image]] = {}
            for job_id, *image in self._db.execute("SELECT * FROM job_images"):
                images.setdefault(job_id, []).append(tuple(image))  # type: ignore[arg-type]
            pauses: dict[str, dict[int, Paused]] = {}
            for job_id, image, step, state in self._db.execute("SELECT * FROM job_pauses"):
                pauses.setdefault(job_id, {})[image] = paused_of(step, state)
        return [stored(r, images.get(r[0], []), pauses.get(r[0], {})) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def stored(r: tuple, images: list[Image], pauses: dict[int, Paused]) -> StoredJob:
    """A ``jobs`` row as ``load`` selects it."""
    job_id, tenant, status, created, deadline, request, edit, view, finished = r
    return StoredJob(
        job_id, tenant, status, created, deadline, ImageRequest.model_validate_json(request),
        None if edit is None else edit_of(edit), None if view is None else json.loads(view),
        finished, images, pauses,
    )  # fmt: skip
