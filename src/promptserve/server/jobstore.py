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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptserve.engine.base import EditInput
from promptserve.server.schemas import ImageRequest

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, deadline REAL NOT NULL, request TEXT NOT NULL, edit BLOB,
    view TEXT, image_id TEXT, image BLOB, media TEXT, finished REAL)"""


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
    image: tuple[str, bytes, str] | None  # a linked result: its image id, bytes and media type
    finished: float | None


def edit_bytes(edit: EditInput) -> bytes:
    """An edit's input as one ``.npz``: its images, mask and strength."""
    arrays = {"image": edit.image, "strength": np.asarray(edit.strength)}
    if edit.mask is not None:
        arrays["mask"] = edit.mask
    arrays.update({f"more{i}": image for i, image in enumerate(edit.more)})
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


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
        self._db.execute(SCHEMA)
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
        self,
        job_id: str,
        view: dict,
        now: float,
        image: tuple[str, bytes, str] | None = None,
    ) -> None:
        """The job's final view, and a linked image's id, bytes and media type."""
        image_id, data, media = image if image is not None else (None, None, None)
        with self._lock, self._db:
            self._db.execute(
                "UPDATE jobs SET status = ?, view = ?, image_id = ?, image = ?, media = ?, "
                "finished = ?, edit = NULL WHERE id = ?",
                (view["status"], json.dumps(view), image_id, data, media, now, job_id),
            )

    def forget(self, job_ids: list[str]) -> None:
        """Jobs no longer kept (their tenant's bounds, their age, refused before queued)."""
        if job_ids:
            with self._lock, self._db:
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    def load(self) -> list[StoredJob]:
        """Every row, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, status, created, deadline, request, edit, view, image_id, "
                "image, media, finished FROM jobs ORDER BY created"
            ).fetchall()
        return [
            StoredJob(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                ImageRequest.model_validate_json(r[5]),
                None if r[6] is None else edit_of(r[6]),
                None if r[7] is None else json.loads(r[7]),
                None if r[8] is None else (r[8], r[9], r[10]),
                r[11],
            )  # fmt: skip
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
