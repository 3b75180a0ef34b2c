"""The asynchronous jobs' routes (``/v1/jobs``): one image each, polled, streamed as events or
cancelled; a job is its tenant's alone (another key's ids answer 404)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptserve.edge.keys import tenant_for
from promptserve.server.context import Context, error
from promptserve.server.imageapi import b64, meta_of
from promptserve.server.images import new_id, valid_id
from promptserve.server.jobs import FINAL, KEPT_JOBS, JobState, forget_finished
from promptserve.server.runtime import Cancelled, JobHandle, Refused, Unmeetable
from promptserve.server.schemas import ImageData, ImageRequest


def job_routes(ctx: Context) -> APIRouter:
    router = APIRouter()
    jobs: OrderedDict[str, JobState] = OrderedDict()

    @router.post("/v1/jobs", status_code=202)
    async def create_job(req: ImageRequest, request: Request):
        if req.n != 1:
            return error(422, "n: a job makes one image; send one job per image", "n")
        tenant = ctx.checked_tenant(req, request)
        if isinstance(tenant, JSONResponse):
            return tenant
        state = JobState(new_id(), tenant)
        ctx.metrics.submitted.inc()
        handle = JobHandle(state.emit, asyncio.get_running_loop().create_future())
        state.handle = handle
        deadline_s = ctx.deadline_s(req)

        async def run() -> None:
            start = time.monotonic()
            try:
                served = await ctx.runtime.submit(
                    req.prompt, tenant, deadline_s, handle, seed=req.seed, look=ctx.look(req)
                )
            except Exception as exc:  # refused, dropped, cancelled or failed: the job says which
                ctx.metrics.count(exc, deadline_s, time.monotonic() - start)
                state.finish(
                    "cancelled" if isinstance(exc, Cancelled) else "failed", error=str(exc)
                )
                return
            ctx.metrics.count(served, deadline_s, time.monotonic() - start, ctx.size_of(req))
            data = ImageData(b64_json=b64(served.result.png), promptserve=meta_of(served))
            state.finish("succeeded", data=data)

        state.task = asyncio.create_task(run())
        try:
            await handle.accepted
        except Unmeetable as exc:
            return error(422, str(exc), "deadline_ms")
        except Refused as exc:
            return error(429, str(exc), None, {"Retry-After": str(int(exc.retry_after_s + 0.999))})
        except Exception as exc:  # failed before it was queued: say so, never hang
            return error(503, f"the job could not be queued: {exc}", None)
        jobs[state.id] = state
        forget_finished(jobs, KEPT_JOBS)
        return {"id": state.id, "status": state.status}

    def find_job(job_id: str, request: Request) -> JobState | JSONResponse:
        if not valid_id(job_id):
            return error(400, "job id must be 32 hex characters", "job_id")
        state = jobs.get(job_id)
        if state is None or state.tenant != tenant_for(
            ctx.keys, request.headers.get("authorization")
        ):
            return error(404, f"job {job_id} not found", "job_id")
        return state

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        state = find_job(job_id, request)
        return state if isinstance(state, JSONResponse) else state.view()

    @router.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        state = find_job(job_id, request)
        if isinstance(state, JSONResponse):
            return state
        if state.status in FINAL:
            return error(409, f"job {job_id} already {state.status}", "job_id")
        ctx.runtime.cancel(state.handle)
        await asyncio.wait_for(asyncio.shield(state.task), timeout=60)
        return state.view()

    @router.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        state = find_job(job_id, request)
        if isinstance(state, JSONResponse):
            return state

        async def stream():
            sent = 0
            changed = state.listen()
            while True:
                changed.clear()
                while sent < len(state.events):
                    kind, data = state.events[sent]
                    sent += 1
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if state.status in FINAL:
                    return
                await changed.wait()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return router
