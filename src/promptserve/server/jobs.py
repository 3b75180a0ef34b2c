"""Asynchronous jobs (``/v1/jobs``): each one's status and the event log its SSE subscribers
replay, and how many finished ones are kept."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from promptserve.server.runtime import JobHandle
from promptserve.server.schemas import ImageData

FINAL = ("succeeded", "failed", "cancelled")
KEPT_JOBS = 512  # finished jobs kept for polling; queued and running ones always stay


def forget_finished(jobs: OrderedDict, keep: int) -> None:
    """Forget the oldest finished jobs beyond ``keep``; a queued or running job stays however
    many there are (admission bounds those), so its id keeps answering until it ends."""
    extra = len(jobs) - keep
    for job_id in [j for j, state in jobs.items() if state.status in FINAL][: max(extra, 0)]:
        del jobs[job_id]


class JobState:
    """One asynchronous job: its status, its event log (replayed to every SSE subscriber)."""

    def __init__(self, job_id: str, tenant: str) -> None:
        self.id, self.tenant = job_id, tenant
        self.status = "queued"
        self.step = 0  # the last denoising step done
        self.events: list[tuple[str, dict]] = []
        self.data: ImageData | None = None
        self.error: str | None = None
        self.handle: JobHandle | None = None
        self.task: asyncio.Task | None = None
        self._listeners: list[asyncio.Event] = []  # one per SSE subscriber

    def listen(self) -> asyncio.Event:
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def _notify(self) -> None:
        for event in self._listeners:
            event.set()

    def emit(self, kind: str, data: dict) -> None:
        if self.status in FINAL or kind == "preview":  # a job asks for no previews
            return
        if kind in ("level", "step"):
            self.status = "running"
        if kind == "step":
            self.step = data["step"]
        self.events.append((kind, data))
        self._notify()

    def finish(self, status: str, data: ImageData | None = None, error: str | None = None) -> None:
        self.data, self.error = data, error
        self.events.append(("done", {"status": status, **({"error": error} if error else {})}))
        self.status = status
        self._notify()

    def view(self) -> dict:
        out: dict = {"id": self.id, "status": self.status, "step": self.step}
        if self.data is not None:
            out["data"] = [self.data.model_dump(exclude_none=True)]  # no "url": null
        if self.error is not None:
            out["error"] = {"message": self.error}
        return out
