"""The asynchronous jobs' routes (``/v1/jobs``): ``n`` images each, polled, streamed as events or
cancelled; a job is its tenant's alone (another key's ids answer 404). With a job store
(``jobstore``) a job is on the disk before its 202, and a restart runs the unfinished again
(``restore_jobs``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptserve.edge.keys import tenant_for
from promptserve.engine.base import EditInput
from promptserve.server.context import Context, error, outcome_error, public_message
from promptserve.server.editform import EDIT_FORM, overlaid, read_edit
from promptserve.server.imageapi import MEDIA_TYPES, encoded, meta_of, seed_of, unsupported
from promptserve.server.images import new_id, valid_id
from promptserve.server.jobs import FINAL, JobBook, JobState
from promptserve.server.jobstore import Image, JobStore
from promptserve.server.runtime import Cancelled, JobHandle, Served
from promptserve.server.schemas import ImageData, ImageRequest
from promptserve.server.webhooks import Delivery, new_secret, payload, refusal

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 10.0  # DELETE waits this long for the job to stop, then answers 202


def job_refusal(req: ImageRequest) -> tuple[str, str] | None:
    """(field, why) for a job this server will not pretend to honour: what generations refuse,
    and what a job has no use for."""
    if req.stream:
        return (
            "stream",
            "a job's progress streams from /v1/jobs/{id}/events; stream is for generations",
        )
    return unsupported(req, job=True)


def webhook_refusal(url: str, book: JobBook) -> str | None:
    if book.store is None or book.hooks is None:
        return "webhooks need the durable job store (not served on serve --ray)"
    return refusal(url, book.hooks.allow)


def hook_for(state: JobState, req: ImageRequest, view: dict) -> Delivery | None:
    """A finished job's webhook delivery (one per job: its id is the message's)."""
    if req.webhook_url is None:
        return None
    body = payload(view, time.time())
    return Delivery(f"msg_{state.id}", state.id, state.tenant, req.webhook_url, body)


def accepted(handle: JobHandle) -> bool:
    future = handle.accepted
    return future.done() and not future.cancelled() and future.exception() is None


async def image_data(
    ctx: Context, served: Served, req: ImageRequest, tenant: str
) -> tuple[ImageData, Image | None]:
    """The job's image as its request asked (format, and a link or base64): encoded off the
    event loop, kept (for a link) on it, where every other route keeps images; and a link's
    image id, bytes and media type (the job store keeps them)."""
    meta = meta_of(served)
    (image,) = await asyncio.to_thread(encoded, [served], req)
    if req.response_format == "url":
        media = MEDIA_TYPES[req.output_format or "png"]
        image_id = ctx.images.put(tenant, image, time.monotonic(), media)
        return ImageData(url=ctx.image_url(image_id), promptserve=meta), (image_id, image, media)
    return ImageData(b64_json=image, promptserve=meta), None


async def run_job(
    ctx: Context,
    book: JobBook,
    state: JobState,
    req: ImageRequest,
    edit: EditInput | None,
    deadline_s: float,
    restored: bool = False,
) -> None:
    """Submit the job's ``n`` images and record how it ended: every image served, or the job
    ended as a whole by the first that was not (the others cancelled: queued ones at once,
    running ones between two steps). A job refused before it was queued leaves no trace (its
    POST answers the refusal), unless a restart ran it again: it was accepted once, so it ends
    failed, saying why."""
    start, images = time.monotonic(), []
    look = ctx.look(req)
    tasks = [
        asyncio.ensure_future(
            ctx.runtime.submit(
                req.prompt,
                state.tenant,
                deadline_s,
                handle,
                seed=seed_of(req, i),
                look=look,
                edit=edit,
                batch=req.batch(job=True),
            )  # fmt: skip
        )
        for i, handle in enumerate(state.handles)
    ]
    try:
        try:
            served = list(await asyncio.gather(*tasks))
        except BaseException:
            for handle in state.handles:
                ctx.runtime.cancel(handle)
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if edit is not None and edit.mask is not None:
            served = await asyncio.to_thread(overlaid, served, edit)
        for one in served:
            ctx.metrics.count(one, deadline_s, time.monotonic() - start, ctx.size_of(req))
        made = [await image_data(ctx, one, req, state.tenant) for one in served]
        images = [kept for _, kept in made if kept is not None]
        state.finish("succeeded", data=[data for data, _ in made])
    except Exception as exc:  # refused, dropped, cancelled or failed: the job says which
        for _ in tasks:
            ctx.metrics.count(exc, deadline_s, time.monotonic() - start)
        cancelled = isinstance(exc, Cancelled)
        state.finish("cancelled" if cancelled else "failed", error=public_message(exc))
    finally:
        if restored or all(accepted(handle) for handle in state.handles):
            book.ended(state, time.monotonic())
            # a job stopped by a shutdown (not final) stays unfinished on the disk: run again
            if book.store is not None and state.status in FINAL:
                view, gone = state.view(), book.let_go()
                await asyncio.to_thread(book.store.forget, gone)  # pushed out by this one
                hook = hook_for(state, req, view)
                await asyncio.to_thread(
                    book.store.finish, state.id, view, time.time(), images, hook
                )
                if hook is not None and book.hooks is not None and book.hooks.sender:
                    book.hooks.sender.wake.set()
        else:  # refused before it was queued: the POST answers that, no job remains
            book.live.pop(state.id, None)
            if book.store is not None:
                await asyncio.to_thread(book.store.forget, [state.id])


def handles_for(state: JobState, n: int) -> list[JobHandle]:
    """One handle per image; the first one's events are the job's (its progress)."""
    loop = asyncio.get_running_loop()
    quiet = lambda kind, data: None  # noqa: E731 - the other images' events go nowhere
    return [JobHandle(state.emit if i == 0 else quiet, loop.create_future()) for i in range(n)]


def durable(handles: list[JobHandle], job_id: str, store: JobStore, found: dict) -> None:
    """A background job's images written to ``store`` as their members are written down
    (paused, or every ``CHECKPOINT_STEPS``), each resuming from where a restart ``found``
    it. The writes run on a thread, one at a time per image, the latest kept."""
    loop = asyncio.get_running_loop()
    for i, handle in enumerate(handles):
        handle.resume = found.get(i)
        handle.keep = partial(keep_latest, loop, store, job_id, i, {})


def keep_latest(loop, store: JobStore, job_id: str, image: int, slot: dict, state) -> None:  # noqa: ANN001
    """Write ``state`` unless a write of this image is under way (then the latest waiting
    state is written after it): a slow disk never queues more than one write per image."""
    slot["next"] = state
    if slot.get("busy"):
        return
    slot["busy"] = True

    async def drain() -> None:
        try:
            while "next" in slot:
                await asyncio.to_thread(store.keep_pause, job_id, image, slot.pop("next"))
        except Exception:  # the store is a best effort for a pause: the job still runs
            log.exception("job %s: could not write image %d down", job_id, image)
        finally:
            slot["busy"] = False

    slot["task"] = loop.create_task(drain())  # held: the loop keeps only a weak reference


async def restore_jobs(ctx: Context, book: JobBook) -> None:
    """After a restart: every finished job back on its tenant's shelf (its age counted from
    when it ended, a linked image under its old id), every unfinished one run again with the
    time its deadline leaves, or ended as expired where none is left."""
    assert book.store is not None
    rows = await asyncio.to_thread(book.store.load)
    wall, now = time.time(), time.monotonic()
    for row in rows:
        if row.view is not None:
            state = JobState.ended_as(row.id, row.tenant, row.view)
            at = now - (wall - (row.finished or wall))
            for image_id, data, media in row.images:
                ctx.images.put(row.tenant, data, at, media, image_id=image_id)
            book.finished.put(row.tenant, row.id, state, at, state.size)
            continue
        state = JobState(row.id, row.tenant)
        state.handles = handles_for(state, row.request.n)
        if row.request.batch(job=True):  # it goes on from where it was last written down
            durable(state.handles, row.id, book.store, row.pauses)
        book.add(state)
        left = row.deadline - wall
        if left <= 0:  # its deadline passed while the server was down
            state.finish("failed", error="expired: its deadline passed before a restart")
            book.ended(state, now)
            hook = hook_for(state, row.request, state.view())
            await asyncio.to_thread(book.store.finish, state.id, state.view(), wall, [], hook)
            continue
        book.restored += 1
        ctx.metrics.jobs_restored.inc()
        task = run_job(ctx, book, state, row.request, row.edit, left, restored=True)
        state.task = asyncio.create_task(task)
    await asyncio.to_thread(book.store.forget, book.let_go())  # aged out while it was down


SWEEP_S = 60.0  # how often finished jobs past their age are deleted from the store


async def sweep_jobs(book: JobBook, period_s: float = SWEEP_S) -> None:
    """Delete from the store, every ``period_s``, the finished jobs past their age: a shelf
    drops them only when it is next read or written, and a quiet tenant's may never be."""
    assert book.store is not None
    while True:
        await asyncio.sleep(period_s)
        book.finished.expire(time.monotonic())
        await asyncio.to_thread(book.store.forget, book.let_go())


def job_routes(ctx: Context, book: JobBook) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/jobs", status_code=202)
    async def create_job(req: ImageRequest, request: Request):
        return await start_job(req, None, request)

    @router.post("/v1/jobs/edits", status_code=202, openapi_extra=EDIT_FORM)
    async def create_edit_job(request: Request):
        """An edit as a job: the form of ``POST /v1/images/edits``."""
        read = await read_edit(ctx, request)
        return read if isinstance(read, JSONResponse) else await start_job(*read, request)

    async def start_job(req: ImageRequest, edit: EditInput | None, request: Request):
        tenant = ctx.checked_tenant(req, request, editing=edit is not None)
        if isinstance(tenant, JSONResponse):
            return tenant
        refusal = job_refusal(req)
        if refusal is not None:
            return error(400, refusal[1], refusal[0])
        if book.full(tenant):
            why = f"this key has {book.in_flight} jobs queued or running (serve --jobs-in-flight)"
            return error(429, why, None, {"Retry-After": "10"})
        answer: dict = {}
        if req.webhook_url is not None:
            why = webhook_refusal(req.webhook_url, book)
            if why is not None:
                return error(400, why, "webhook_url")
            assert book.store is not None and book.hooks is not None
            if tenant not in book.hooks.secrets:  # made once and shown once, then kept
                secret, made = await asyncio.to_thread(book.store.secret, tenant, new_secret)
                if made:
                    answer["webhook_secret"] = secret
        state = JobState(new_id(), tenant)
        ctx.metrics.submitted.inc(req.n)
        state.handles = handles_for(state, req.n)
        if book.store is not None and req.batch(job=True):
            durable(state.handles, state.id, book.store, {})
        deadline_s = ctx.deadline_s(req, job=True)
        if book.store is not None:  # on the disk before it runs: a job answered 202 is kept
            wall = time.time()
            row = (state.id, tenant, req, edit, wall, wall + deadline_s)
            await asyncio.to_thread(book.store.accept, *row)
        book.add(state)
        state.task = asyncio.create_task(run_job(ctx, book, state, req, edit, deadline_s))
        try:  # every image queued (one refused: the others are cancelled, no job remains)
            await asyncio.gather(*(handle.accepted for handle in state.handles))
        except BaseException as exc:
            return outcome_error(exc)
        return {"id": state.id, "status": state.status} | answer

    def find_job(job_id: str, request: Request) -> JobState | JSONResponse:
        if not valid_id(job_id):
            return error(400, "job id must be 32 hex characters", "job_id")
        tenant = tenant_for(ctx.keys, request.headers.get("authorization"))
        state = book.get(job_id, tenant, time.monotonic())
        if state is None:
            return error(404, f"job {job_id} not found or expired", "job_id")
        return state

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        state = find_job(job_id, request)
        return state if isinstance(state, JSONResponse) else state.view()

    @router.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        """Cancels between two steps: the job's view once it has stopped, or 202 with its
        status now where the step it is in outlasts ``CANCEL_WAIT_S`` (it stops after it)."""
        state = find_job(job_id, request)
        if isinstance(state, JSONResponse):
            return state
        if state.status in FINAL:
            return error(409, f"job {job_id} already {state.status}", "job_id")
        for handle in state.handles:
            ctx.runtime.cancel(handle)
        done, _ = await asyncio.wait({state.task}, timeout=CANCEL_WAIT_S)
        if not done:
            return JSONResponse({**state.view(), "cancel_requested": True}, status_code=202)
        return state.view()

    @router.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        state = find_job(job_id, request)
        if isinstance(state, JSONResponse):
            return state

        async def stream():
            sent = 0
            changed = state.listen()
            try:
                while True:
                    changed.clear()
                    while sent < len(state.events):
                        kind, data = state.events[sent]
                        sent += 1
                        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if state.status in FINAL:
                        return
                    await changed.wait()
            finally:  # ended, or the client went away: its listener goes with it
                state.unlisten(changed)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return router
