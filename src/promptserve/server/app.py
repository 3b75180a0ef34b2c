"""The FastAPI app: the OpenAI Images API on the live runtime, plus health and metrics.

The routes live beside it (``generations.py``, ``jobroutes.py``), the gauges' reading in
``observer.py``; this wires them to one runtime and adds what is small: models, the server's
description, health, metrics and the dashboard.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptserve.edge.keys import KeyTable
from promptserve.edge.limits import HttpLimits, RequestGate
from promptserve.engine.sizes import label
from promptserve.server.context import Context, error, first_problem
from promptserve.server.generations import image_routes
from promptserve.server.jobroutes import job_routes, restore_jobs, sweep_jobs
from promptserve.server.jobs import JOB_BOUNDS, JobBook
from promptserve.server.jobstore import JobStore
from promptserve.server.kept import Bounds
from promptserve.server.metrics import History
from promptserve.server.observer import record, scrape
from promptserve.server.runtime import LiveRuntime
from promptserve.server.webhooks import Allow, Hooks, Sender, new_secret
from promptserve.strength import EDITS_ONLY, INSTRUCTION_EDITS, images_taken
from promptserve.web import page

log = logging.getLogger(__name__)


def create_app(
    runtime: LiveRuntime,
    slo_s: float,
    keys: dict[str, str] | None = None,
    max_body_bytes: int = 1 << 20,
    public_url: str | None = None,
    limits: HttpLimits | None = None,
    model_names: tuple[str, ...] = (),
    jobs: JobStore | None = None,
    webhooks: tuple[Allow, dict[str, str]] | None = None,
    job_limits: tuple[int, Bounds] = (1000, JOB_BOUNDS),
) -> FastAPI:
    """``public_url``: where clients reach this server (image links start with it; without it
    they are relative to the API root, never built from a client's Host header). ``jobs``: the
    durable job store (None: jobs live in memory only)."""
    table = KeyTable(keys)
    limits = limits or HttpLimits()
    names = model_names or (runtime.workers.name,)
    ctx = Context(runtime, slo_s, table, public_url, names)
    history = History()
    book = JobBook(job_limits[1], store=jobs, in_flight=job_limits[0])
    if jobs is not None and webhooks is not None:
        book.hooks = hooks_for(jobs, *webhooks, ctx.metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runtime.start()
        if book.store is not None:  # a restart: the jobs it had accepted
            await restore_jobs(ctx, book)
        recorder = asyncio.create_task(record(runtime, ctx.metrics, history))
        sweeper = asyncio.create_task(sweep_jobs(book)) if book.store is not None else None
        sender = book.hooks.sender if book.hooks is not None else None
        sending = asyncio.create_task(sender.run()) if sender is not None else None
        yield
        recorder.cancel()
        for task in (sweeper, sending):
            if task is not None:
                task.cancel()
        await runtime.stop()

    app = FastAPI(title="promptserve", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime  # for operators' tooling and tests: the live policy state
    app.state.context = ctx  # what the routes share (a Ray ingress sets where peers' images are)
    app.state.http_limits = limits  # the connection's limits, for whoever serves this app
    app.add_middleware(RequestGate, max_body_bytes=max_body_bytes, keys=table, limits=limits)
    app.include_router(image_routes(ctx))
    app.state.jobs = book  # every job it knows, for operators' tooling and tests
    app.include_router(job_routes(ctx, book))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a body that is not JSON at all has a character offset where a field name would be
        field, message = first_problem(exc.errors())
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if field == "body" and kind != "application/json":
            message += f" (the body must be JSON sent as application/json, not {kind or 'untyped'})"
        return error(400, message, field)

    @app.api_route("/v1/images/variations", methods=["GET", "POST"], include_in_schema=False)
    async def not_served(request: Request) -> JSONResponse:
        """The Images API's other endpoint: named, not a bare 405."""
        name = request.url.path.rsplit("/", 1)[-1]
        return error(
            404, f"images/{name} is not served yet: images/generations and images/edits are", None
        )

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("dashboard")

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        """Anything a route did not expect: JSON like every other error, its text in the log
        (an exception's message can carry paths, prompts or internals)."""
        log.error("a request failed: %r", exc, exc_info=exc)
        return error(500, "the server failed on this request (the detail is in its log)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        param = getattr(exc, "param", None)
        return error(exc.status_code, str(exc.detail), param, getattr(exc, "headers", None))

    served_model = {
        "id": names[0],
        "object": "model",
        "created": 0,
        "owned_by": "promptserve",
        # an extension: the sizes a request may ask for (the first is what ``auto`` gives)
        "sizes": [label(s) for s in runtime.workers.sizes],
        "adapters": list(runtime.workers.adapters),  # LoRA names a request may give
        # what it runs and accepts: its family, schedule and levels K, its guidance input
        "family": runtime.workers.edit_family,
        "steps": runtime.workers.total_steps,
        "levels": list(runtime.workers.levels),
        "guidance": asdict(runtime.workers.guidance),
        "accepts": {
            "negative_prompt": runtime.workers.guidance.negative,
            "guidance_scale": runtime.workers.guidance.kind != "none",
            "edits": True,  # /v1/images/edits: image-to-image and inpainting
            "generations": runtime.workers.edit_family not in EDITS_ONLY,
            "mask": runtime.workers.edit_family not in INSTRUCTION_EDITS,
            "images_per_edit": images_taken(runtime.workers.edit_family),
        },
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served_model]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in names:
            return error(404, f"model {model_id!r} not found (served: {names[0]})", "model")
        return served_model

    @app.get("/v1/server")
    async def server_description():
        """What the simulator needs to replay this server's decisions (``bench --compare-sim``):
        its policy, GPUs, deadline, embedder and the profile it plans with."""
        return {
            "policy": runtime.policy.name,
            "workers": runtime.workers.count,
            "slo_s": slo_s,
            "embedder": "hashing" if runtime.embedder.name.startswith("hashing") else "minilm",
            "profile": asdict(
                runtime.setting.profiles[0]
            ),  # as planned: sizes, adapters, intervals
            # the modelled backend runs this many times faster than the profile it plans with
            "speedup": runtime.workers.speedup,
            # what guidance_scale means for this model, its default and range
            "guidance": asdict(runtime.workers.guidance),
            "sizes": [label(s) for s in runtime.workers.sizes],
        }

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        """Live charts from this server's own /metrics (polled by the page; no CDN), the
        numbers of this moment inlined for the first paint."""
        first = json.dumps(scrape(runtime, ctx.metrics).decode()).replace("</", "<\\/")
        return HTMLResponse(page("dashboard.html").replace('"/*FIRST*/"', first, 1))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready while every scheduling loop runs and at least one worker is up; says how many
        workers are up, whatever the policy family."""
        load = runtime.load()
        if not runtime.loops_alive():
            return error(503, "a scheduling loop has stopped: this server takes no work", None)
        if load.gpus_up == 0:
            return error(503, f"none of the {load.gpus} workers is up", None)
        return {"status": "ready", "workers": load.gpus, "workers_up": load.gpus_up}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(scrape(runtime, ctx.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/metrics/history")
    async def metrics_history(since_ms: float = 0.0):
        """``/metrics`` once a second for the last 10 minutes (epoch ms), for the dashboard."""
        return {"samples": history.since(since_ms)}

    return app


def hooks_for(store: JobStore, allow: Allow, secrets: dict[str, str], metrics) -> Hooks:  # noqa: ANN001
    """The webhooks of a server with a job store: a sender over the store's pending
    deliveries, signing with the keys file's secret of a tenant or the one the store keeps."""

    def secret_of(tenant: str) -> str:
        return secrets.get(tenant) or store.secret(tenant, new_secret)[0]

    def counted(counts: dict[str, int]) -> None:
        for outcome, n in counts.items():
            metrics.webhooks.labels(outcome).set(n)

    sender = Sender(allow, secret_of, store.deliveries, store.attempted, on_count=counted)
    return Hooks(allow, secrets, sender if allow else None)
