"""The FastAPI app: the OpenAI Images API on the live runtime, plus health and metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptserve.server.imageapi import (
    MEDIA_TYPES,
    b64,
    encode_image,
    error_event,
    event,
    image_body,
    images_body,
    meta_of,
    served_quality,
    unsupported,
    usage,
)
from promptserve.server.images import ImageStore, new_id, valid_id
from promptserve.server.jobs import FINAL, KEPT_JOBS, JobState, forget_finished
from promptserve.server.keys import tenant_for
from promptserve.server.limits import HttpLimits, RequestGate
from promptserve.server.metrics import History, Metrics, exposition
from promptserve.server.runtime import (
    Cancelled,
    Dropped,
    JobHandle,
    Refused,
    Runtime,
    Served,
    Unmeetable,
)
from promptserve.server.schemas import ImageData, ImageRequest, ImagesResponse, visible
from promptserve.web import page


def error(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    runtime: Runtime,
    slo_s: float,
    size: str,
    keys: dict[str, str] | None = None,
    max_body_bytes: int = 1 << 20,
    public_url: str | None = None,
    limits: HttpLimits | None = None,
) -> FastAPI:
    """``public_url``: where clients reach this server (image links start with it; without it
    they are relative to the API root, never built from a client's Host header)."""
    keys = keys or {}
    limits = limits or HttpLimits()
    metrics = Metrics()
    history = History()
    images = ImageStore()

    async def record_history() -> None:
        while True:
            history.record(time.time() * 1000, scrape())
            await asyncio.sleep(1.0)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runtime.start()
        recorder = asyncio.create_task(record_history())
        yield
        recorder.cancel()
        await runtime.stop()

    app = FastAPI(title="promptserve", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime  # for operators' tooling and tests: the live policy state
    app.state.http_limits = limits  # the connection's limits, for whoever serves this app
    app.add_middleware(RequestGate, max_body_bytes=max_body_bytes, keys=keys, limits=limits)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        # a body that is not JSON at all has a character offset where a field name would be
        parts = [str(p) for p in first["loc"] if p != "body" and not isinstance(p, int)]
        field = ".".join(parts) or "body"
        return error(422, f"{field}: {first['msg']}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        param = getattr(exc, "param", None)
        return error(exc.status_code, str(exc.detail), param, getattr(exc, "headers", None))

    def checked_tenant(req: ImageRequest, request: Request) -> str | JSONResponse:
        """The caller's tenant, or the error to answer: no valid key (401), unknown size (400)."""
        tenant = tenant_for(keys, request.headers.get("authorization"))
        if tenant is None:
            return error(
                401, "a valid API key is required (Authorization: Bearer KEY)", "authorization"
            )
        if not visible(req.prompt):
            return error(400, "prompt: has no visible character", "prompt")
        if req.size not in (None, "auto", size):
            return error(
                400, f"size {req.size!r} is not supported (supported: {size} or auto)", "size"
            )
        if req.model is not None and req.model != runtime.workers.name:
            return error(
                404,
                f"model {req.model!r} is not served here (served: {runtime.workers.name})",
                "model",
            )
        return tenant

    def outcome_error(exc: BaseException) -> JSONResponse:
        """A refused or failed image as its HTTP answer."""
        if isinstance(exc, Unmeetable):
            return error(422, str(exc), "deadline_ms")
        if isinstance(exc, Refused):
            return error(429, str(exc), None, {"Retry-After": str(int(exc.retry_after_s + 0.999))})
        if isinstance(exc, Dropped):
            return error(503, str(exc), None, {"Retry-After": "1"})
        return error(500, f"generation failed: {exc}")

    async def client_gone(request: Request) -> None:
        """Returns once the client has closed its connection (the body is already read, so
        the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def generations(req: ImageRequest, request: Request):
        tenant = checked_tenant(req, request)
        if isinstance(tenant, JSONResponse):
            return tenant
        refusal = unsupported(req)
        if refusal is not None:
            return error(400, refusal[1], refusal[0])
        deadline_s = req.deadline_ms / 1000.0 if req.deadline_ms else slo_s
        if req.stream:
            return await stream_generation(req, tenant, deadline_s)
        outcomes = await generate(req, tenant, deadline_s, request)
        if isinstance(outcomes, JSONResponse):
            return outcomes
        data = []
        media = MEDIA_TYPES[req.output_format or "png"]
        for s in outcomes:
            image = encode_image(s.result.png, req.output_format, req.output_compression)
            if req.response_format == "url":
                image_id = images.put(image, time.monotonic(), media)
                data.append(image_body(meta_of(s), url=image_url(image_id)))
            else:
                data.append(image_body(meta_of(s), b64_json=b64(image)))
        body = images_body(int(time.time()), data, req, size, served_quality(outcomes))
        return JSONResponse(body)

    def image_url(image_id: str) -> str:
        path = f"/v1/images/{image_id}"
        return public_url.rstrip("/") + path if public_url else path

    async def generate(
        req: ImageRequest, tenant: str, deadline_s: float, request: Request
    ) -> list[Served] | JSONResponse:
        """The request's ``n`` images, served or refused whole: the first image refused,
        dropped or failed cancels the others (queued ones at once, running ones between two
        steps), as does a client that goes away, as closing a stream does. Nothing is computed
        for an answer that can no longer be a success."""
        start = time.monotonic()
        metrics.submitted.inc(req.n)
        handles = [JobHandle(lambda kind, data: None) for _ in range(req.n)]
        images = [
            asyncio.ensure_future(
                runtime.submit(req.prompt, tenant, deadline_s, h, exact=req.exact)
            )
            for h in handles
        ]
        every = asyncio.gather(*images, return_exceptions=True)
        watch = [asyncio.ensure_future(client_gone(request)), asyncio.ensure_future(failed(images))]
        await asyncio.wait({every, *watch}, return_when=asyncio.FIRST_COMPLETED)
        for task in watch:
            task.cancel()
        if not every.done():
            for h in handles:
                runtime.cancel(h)
        outcomes = await every
        cause = next(
            (o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, Cancelled)),
            None,
        )
        for outcome in outcomes:  # every image ends in exactly one outcome label
            whole = cause if cause is not None and isinstance(outcome, Cancelled) else outcome
            metrics.count(whole, deadline_s, time.monotonic() - start)
        for exc in (cause, *outcomes):
            if isinstance(exc, BaseException):
                return outcome_error(exc)
        return outcomes  # type: ignore[return-value]

    async def failed(images: list[asyncio.Future]) -> None:
        """Returns at the first image that fails (or once all are done)."""
        for image in asyncio.as_completed(images):
            try:
                await image
            except Exception:
                return

    async def stream_generation(req: ImageRequest, tenant: str, deadline_s: float):
        """``stream: true``: previews decoded from intermediate steps as
        ``image_generation.partial_image`` events, then ``image_generation.completed``. A
        refusal before it is queued is an HTTP error; closing the stream cancels it."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handle = JobHandle(
            lambda kind, data: events.put_nowait((kind, data)),
            loop.create_future(),
            partial_images=req.partial_images or 0,
        )
        start = time.monotonic()
        metrics.submitted.inc()
        task = asyncio.create_task(
            runtime.submit(req.prompt, tenant, deadline_s, handle, exact=req.exact)
        )

        def counted(t: asyncio.Task) -> None:  # every image ends in one outcome label
            outcome = Cancelled("cancelled") if t.cancelled() else t.exception() or t.result()
            metrics.count(outcome, deadline_s, time.monotonic() - start)

        task.add_done_callback(counted)
        try:
            await handle.accepted
        except BaseException as exc:  # refused or failed before it was queued
            return outcome_error(exc)

        async def sse():
            created, sent = int(time.time()), [0]

            def partial(kind: str, data: dict) -> list[str]:
                """A preview as the next partial image, if the caller still wants one."""
                if kind != "preview" or sent[0] >= handle.partial_images:
                    return []
                image = encode_image(data["png"], req.output_format, req.output_compression)
                sent[0] += 1
                return [event("partial_image", created, b64(image), req, size, index=sent[0] - 1)]

            try:
                while not task.done():
                    get = asyncio.ensure_future(events.get())
                    await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()  # the item, if any, stays queued: drained below
                        continue
                    for body in partial(*get.result()):
                        yield body
                while not events.empty():  # what came in before the answer goes out first
                    for body in partial(*events.get_nowait()):
                        yield body
                if task.cancelled() or task.exception() is not None:
                    yield error_event(
                        str(task.exception() if not task.cancelled() else "cancelled")
                    )
                    return
                s: Served = task.result()
                image = encode_image(s.result.png, req.output_format, req.output_compression)
                meta = meta_of(s).model_dump()
                yield event(
                    "completed", int(time.time()), b64(image), req, size,
                    usage=usage(req.prompt), promptserve=meta,
                )  # fmt: skip
            finally:
                if not task.done():  # the caller closed the stream: stop the generation
                    runtime.cancel(handle)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/v1/images/generations", include_in_schema=False)
    async def generations_get():
        return error(405, "use POST for /v1/images/generations", None, {"Allow": "POST"})

    @app.get("/v1/images/{image_id}", name="image")
    async def image(image_id: str):
        if not valid_id(image_id):
            return error(400, "image id must be 32 hex characters", "image_id")
        kept = images.get(image_id, time.monotonic())
        if kept is None:
            return error(404, f"image {image_id} not found or expired", "image_id")
        return Response(kept[0], media_type=kept[1])

    jobs: OrderedDict[str, JobState] = OrderedDict()

    @app.post("/v1/jobs", status_code=202)
    async def create_job(req: ImageRequest, request: Request):
        if req.n != 1:
            return error(422, "n: a job makes one image; send one job per image", "n")
        tenant = checked_tenant(req, request)
        if isinstance(tenant, JSONResponse):
            return tenant
        state = JobState(new_id(), tenant)
        metrics.submitted.inc()
        handle = JobHandle(state.emit, asyncio.get_running_loop().create_future())
        state.handle = handle
        deadline_s = req.deadline_ms / 1000.0 if req.deadline_ms else slo_s

        async def run() -> None:
            start = time.monotonic()
            try:
                served = await runtime.submit(req.prompt, tenant, deadline_s, handle)
            except Exception as exc:  # refused, dropped, cancelled or failed: the job says which
                metrics.count(exc, deadline_s, time.monotonic() - start)
                state.finish(
                    "cancelled" if isinstance(exc, Cancelled) else "failed", error=str(exc)
                )
                return
            metrics.count(served, deadline_s, time.monotonic() - start)
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
        if state is None or state.tenant != tenant_for(keys, request.headers.get("authorization")):
            return error(404, f"job {job_id} not found", "job_id")
        return state

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        state = find_job(job_id, request)
        return state if isinstance(state, JSONResponse) else state.view()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        state = find_job(job_id, request)
        if isinstance(state, JSONResponse):
            return state
        if state.status in FINAL:
            return error(409, f"job {job_id} already {state.status}", "job_id")
        runtime.cancel(state.handle)
        await asyncio.wait_for(asyncio.shield(state.task), timeout=60)
        return state.view()

    @app.get("/v1/jobs/{job_id}/events")
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

    served_model = {
        "id": runtime.workers.name,
        "object": "model",
        "created": 0,
        "owned_by": "promptserve",
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served_model]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != runtime.workers.name:
            return error(
                404, f"model {model_id!r} not found (served: {runtime.workers.name})", "model"
            )
        return served_model

    @app.get("/v1/server")
    async def server_description():
        """What the simulator needs to replay this server's decisions (``bench --compare-sim``):
        its policy, GPUs, deadline, embedder and the profile it plans with."""
        from dataclasses import asdict

        return {
            "policy": runtime.policy.name,
            "workers": runtime.workers.count,
            "slo_s": slo_s,
            "embedder": "hashing" if runtime.embedder.name.startswith("hashing") else "minilm",
            "profile": asdict(runtime.workers.profile),
            # the modelled backend runs this many times faster than the profile it plans with
            "speedup": getattr(getattr(runtime.workers, "engines", [None])[0], "_speedup", 1.0),
        }

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        """Live charts from this server's own /metrics (polled by the page; no CDN)."""
        return HTMLResponse(page("dashboard.html"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not runtime.loops_alive():
            return error(503, "a scheduling loop has stopped: this server takes no work", None)
        return {"status": "ready", "workers": len(runtime.dispatcher.gpus)}

    def scrape() -> bytes:
        """Copy the runtime's state into the gauges; the exposition text."""
        for k, n in runtime.queue_lengths().items():
            metrics.queue.labels(str(k)).set(n)
        for k, n in runtime.gpus_per_level().items():
            metrics.gpus.labels(str(k)).set(n)
        c = runtime.counters
        metrics.hit_ratio.set(c.cache_hits / c.lookups if c.lookups else 0.0)
        metrics.planner.set(c.planner_ms[-1] if c.planner_ms else 0.0)
        metrics.retried.set(c.retried)
        metrics.skipped.set(runtime.cache.skipped_writes)
        stats = runtime.cache.stats()
        metrics.cache_bytes.set(stats["bytes"])
        metrics.cache_quota.set(stats["quota_bytes"] or 0)
        metrics.cache_entries.set(stats["entries"])
        metrics.evictions.set(stats["evictions"])
        metrics.evicted_bytes.set(stats["evicted_bytes"])
        metrics.embed_rows.set(getattr(runtime.embedder, "rows", 0))
        metrics.cache_failures.set(runtime.counters.cache_update_failures)
        metrics.loop_errors.set(runtime.counters.loop_errors)
        metrics.batch_timeouts.set(runtime.counters.batch_timeouts)
        metrics.workers_up.set(len(runtime.dispatcher.up_gpus()))
        for gpu, count in enumerate(getattr(runtime, "inflight", list)()):
            metrics.inflight.labels(str(gpu)).set(count)
        return exposition(metrics)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/metrics/history")
    async def metrics_history(since_ms: float = 0.0):
        """``/metrics`` once a second for the last 10 minutes (epoch ms), for the dashboard."""
        return {"samples": history.since(since_ms)}

    return app
