"""Asynchronous jobs (``/v1/jobs``): each one's status and the event log its SSE subscribers
replay, and which finished ones are kept (per tenant, by count, bytes and age:
``kept.TenantShelf``), so that one tenant's churn never pushes out another's results."""

from __future__ import annotations

import asyncio

from promptserve.server.jobstore import JobStore
from promptserve.server.kept import Bounds, TenantShelf
from promptserve.server.runtime import JobHandle
from promptserve.server.schemas import ImageData
from promptserve.server.webhooks import Hooks

FINAL = ("succeeded", "failed", "cancelled")
# finished jobs kept for polling, per tenant; queued and running ones always stay (admission
# bounds those)
JOB_BOUNDS = Bounds(count=256, bytes=256 << 20, ttl_s=3600.0)


class JobState:
    """One asynchronous job: its status, its event log (replayed to every SSE subscriber)."""

    def __init__(self, job_id: str, tenant: str) -> None:
        self.id, self.tenant = job_id, tenant
        self.status = "queued"
        self.step = 0  # the last denoising step done
        self.events: list[tuple[str, dict]] = []
        self.data: list[ImageData] = []  # its ``n`` images, once it succeeded
        self.kept_data: list[dict] | None = None  # a restored job's ``data``, as it was viewed
        self.error: str | None = None
        self.handles: list[JobHandle] = []  # one per image; the first's events are the job's
        self.task: asyncio.Task | None = None
        self._listeners: set[asyncio.Event] = set()  # one per SSE subscriber while it reads

    def listen(self) -> asyncio.Event:
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        """A subscriber's stream ended (read to the end, or its client went away)."""
        self._listeners.discard(event)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

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

    @classmethod
    def ended_as(cls, job_id: str, tenant: str, view: dict) -> JobState:
        """A finished job as its stored view gives it (a restart: ``jobstore``)."""
        state = cls(job_id, tenant)
        state.step = view.get("step", 0)
        state.kept_data = view.get("data")  # answered as written (its None fields left out)
        state.finish(view["status"], [], view.get("error", {}).get("message"))
        return state

    def finish(
        self, status: str, data: list[ImageData] | None = None, error: str | None = None
    ) -> None:
        self.data, self.error = data or [], error
        self.events.append(("done", {"status": status, **({"error": error} if error else {})}))
        self.status = status
        self._notify()

    @property
    def size(self) -> int:
        """Bytes it holds, roughly: its image (base64) and its event log."""
        images = [d.b64_json for d in self.data] or [
            d.get("b64_json") for d in self.kept_data or ()
        ]
        return sum(len(b or "") for b in images) + 64 * len(self.events)

    def view(self) -> dict:
        out: dict = {"id": self.id, "status": self.status, "step": self.step}
        if self.data:
            out["data"] = [d.model_dump(exclude_none=True) for d in self.data]  # no "url": null
        elif self.kept_data is not None:
            out["data"] = self.kept_data
        if self.error is not None:
            out["error"] = {"message": self.error}
        return out


class JobBook:
    """Every job the server knows: the live ones by id, the finished ones on a shelf; with a
    ``store``, each one on the disk too, and a job the shelf lets go deleted there."""

    def __init__(
        self, bounds: Bounds = JOB_BOUNDS, store: JobStore | None = None, in_flight: int = 1000
    ) -> None:
        self.live: dict[str, JobState] = {}
        self.in_flight = in_flight  # per tenant: a new job past it is refused (429)
        self.store = store
        self.dropped: list[str] = []  # let go by the shelf, not yet deleted from the store
        drop = None if store is None else self.dropped.append
        self.finished: TenantShelf[JobState] = TenantShelf(bounds, on_drop=drop)
        self.restored = 0  # unfinished jobs a restart ran again
        self.hooks: Hooks | None = None  # webhooks (a job store's; ``webhooks``)

    def let_go(self) -> list[str]:
        """The jobs the shelf let go since the last call (to delete from the store)."""
        gone, self.dropped[:] = list(self.dropped), []
        return gone

    def add(self, state: JobState) -> None:
        self.live[state.id] = state

    def full(self, tenant: str) -> bool:
        """Whether ``tenant`` has its most jobs queued or running (one tenant's bulk work never
        takes every slot of the book)."""
        return sum(s.tenant == tenant for s in self.live.values()) >= self.in_flight

    def ended(self, state: JobState, now: float) -> None:
        """The job is final: from now on it is kept within its tenant's bounds."""
        if self.live.pop(state.id, None) is not None:
            self.finished.put(state.tenant, state.id, state, now, state.size)

    def get(self, job_id: str, tenant: str | None, now: float) -> JobState | None:
        """The job, if it is ``tenant``'s and still kept."""
        state = self.live.get(job_id)
        if state is None:
            kept = self.finished.get(job_id, now)
            state = None if kept is None else kept[1]
        return state if state is not None and state.tenant == tenant else None
