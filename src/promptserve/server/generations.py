"""The images routes: ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (whole
answers and streams: an edit is a generation from its own image) and the images kept for
``response_format: url``."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from promptserve.engine.base import EditInput
from promptserve.server.context import Context, error, outcome_error, public_message
from promptserve.server.editform import EDIT_FORM, overlaid, read_edit
from promptserve.server.imageapi import (
    MEDIA_TYPES,
    b64_of,
    encoded,
    error_event,
    event,
    image_body,
    images_body,
    meta_of,
    seed_of,
    served_quality,
    unsupported,
    usage,
)
from promptserve.server.images import valid_id
from promptserve.server.runtime import Cancelled, JobHandle, Served
from promptserve.server.schemas import ImageRequest, ImagesResponse


def image_routes(ctx: Context) -> APIRouter:
    router = APIRouter()

    async def client_gone(request: Request) -> None:
        """Returns once the client has closed its connection (the body is already read, so
        the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @router.post("/v1/images/generations", response_model=ImagesResponse)
    async def generations(req: ImageRequest, request: Request):
        return await answer(req, None, request)

    @router.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=EDIT_FORM)
    async def edits(request: Request):
        """An edit: the generations' request and answer, from its own image (``editform``)."""
        read = await read_edit(ctx, request)
        return read if isinstance(read, JSONResponse) else await answer(*read, request)

    async def answer(req: ImageRequest, edit: EditInput | None, request: Request):
        """A generation's or an edit's answer: whole, or streamed."""
        tenant = ctx.checked_tenant(req, request, editing=edit is not None)
        if isinstance(tenant, JSONResponse):
            return tenant
        refusal = unsupported(req)
        if refusal is not None:
            return error(400, refusal[1], refusal[0])
        deadline_s = ctx.deadline_s(req)
        if req.stream:
            return await stream_generation(req, tenant, deadline_s, edit)
        outcomes = await generate(req, tenant, deadline_s, request, edit)
        if isinstance(outcomes, JSONResponse):
            return outcomes
        if edit is not None and edit.mask is not None:  # the input's pixels outside the mask
            outcomes = await asyncio.to_thread(overlaid, outcomes, edit)
        data = []
        media = MEDIA_TYPES[req.output_format or "png"]
        # encoding (a WebP of 1024² is seconds) and base64 run off the event loop
        images = await asyncio.to_thread(encoded, outcomes, req)
        for s, image in zip(outcomes, images, strict=True):
            if req.response_format == "url":
                image_id = ctx.images.put(tenant, image, time.monotonic(), media)
                data.append(image_body(meta_of(s), url=ctx.image_url(image_id)))
            else:
                data.append(image_body(meta_of(s), b64_json=image))
        body = images_body(int(time.time()), data, req, ctx.size_of(req), served_quality(outcomes))
        return JSONResponse(body)

    async def generate(
        req: ImageRequest, tenant: str, deadline_s: float, request: Request, edit: EditInput | None
    ) -> list[Served] | JSONResponse:
        """The request's ``n`` images, served or refused whole: the first image refused,
        dropped or failed cancels the others (queued ones at once, running ones between two
        steps), as does a client that goes away, as closing a stream does. Nothing is computed
        for an answer that can no longer be a success."""
        start = time.monotonic()
        ctx.metrics.submitted.inc(req.n)
        handles = [JobHandle(lambda kind, data: None, quiet=True) for _ in range(req.n)]
        look = ctx.look(req)
        images = [
            asyncio.ensure_future(
                ctx.runtime.submit(
                    req.prompt,
                    tenant,
                    deadline_s,
                    h,
                    exact=req.exact,
                    seed=seed_of(req, i),
                    look=look,
                    edit=edit,
                    batch=req.batch(job=False),
                )  # fmt: skip
            )
            for i, h in enumerate(handles)
        ]
        every = asyncio.gather(*images, return_exceptions=True)
        watch = [asyncio.ensure_future(client_gone(request)), asyncio.ensure_future(failed(images))]
        await asyncio.wait({every, *watch}, return_when=asyncio.FIRST_COMPLETED)
        for task in watch:
            task.cancel()
        if not every.done():
            for h in handles:
                ctx.runtime.cancel(h)
        outcomes = await every
        cause = next(
            (o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, Cancelled)),
            None,
        )
        for outcome in outcomes:  # every image ends in one outcome label: the answer's own
            # (an image refused while its sibling was dropped counts as the answer does)
            whole = cause if cause is not None and isinstance(outcome, BaseException) else outcome
            ctx.metrics.count(whole, deadline_s, time.monotonic() - start, ctx.size_of(req))
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

    async def stream_generation(
        req: ImageRequest, tenant: str, deadline_s: float, edit: EditInput | None
    ):
        """``stream: true``: previews decoded from intermediate steps as
        ``image_generation.partial_image`` events, then ``image_generation.completed``. A
        refusal before it is queued is an HTTP error; closing the stream cancels it."""
        events: asyncio.Queue = asyncio.Queue()
        api = "image_generation" if edit is None else "image_edit"
        loop = asyncio.get_running_loop()
        handle = JobHandle(
            lambda kind, data: events.put_nowait((kind, data)),
            loop.create_future(),
            partial_images=req.partial_images or 0,
        )
        start = time.monotonic()
        ctx.metrics.submitted.inc()
        task = asyncio.create_task(
            ctx.runtime.submit(
                req.prompt,
                tenant,
                deadline_s,
                handle,
                exact=req.exact,
                seed=req.seed,
                look=ctx.look(req),
                edit=edit,
                batch=req.batch(job=False),
            )  # fmt: skip
        )

        def counted(t: asyncio.Task) -> None:  # every image ends in one outcome label
            outcome = Cancelled("cancelled") if t.cancelled() else t.exception() or t.result()
            ctx.metrics.count(outcome, deadline_s, time.monotonic() - start, ctx.size_of(req))

        task.add_done_callback(counted)
        try:
            await handle.accepted
        except BaseException as exc:  # refused or failed before it was queued
            return outcome_error(exc)

        async def sse():
            created, sent = int(time.time()), [0]

            async def partial(kind: str, data: dict) -> list[str]:
                """A preview as the next partial image, if the caller still wants one."""
                if kind != "preview" or sent[0] >= handle.partial_images:
                    return []
                sent[0] += 1
                index = sent[0] - 1
                image = await asyncio.to_thread(b64_of, data["png"], req)
                return [
                    event(
                        "partial_image",
                        created,
                        image,
                        req,
                        ctx.size_of(req),
                        index=index,
                        api=api,
                    )  # fmt: skip
                ]

            try:
                while not task.done():
                    get = asyncio.ensure_future(events.get())
                    await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()  # the item, if any, stays queued: drained below
                        continue
                    for body in await partial(*get.result()):
                        yield body
                while not events.empty():  # what came in before the answer goes out first
                    for body in await partial(*events.get_nowait()):
                        yield body
                if task.cancelled() or task.exception() is not None:
                    yield error_event(
                        public_message(task.exception()) if not task.cancelled() else "cancelled"
                    )
                    return
                s: Served = task.result()
                if edit is not None and edit.mask is not None:
                    (s,) = await asyncio.to_thread(overlaid, [s], edit)
                image = await asyncio.to_thread(b64_of, s.result.png, req)
                meta = meta_of(s).model_dump()
                yield event(
                    "completed", int(time.time()), image, req, ctx.size_of(req),
                    usage=usage(req.prompt), promptserve=meta, api=api,
                )  # fmt: skip
            finally:
                if not task.done():  # the caller closed the stream: stop the generation
                    ctx.runtime.cancel(handle)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @router.get("/v1/images/generations", include_in_schema=False)
    async def generations_get():
        return error(405, "use POST for /v1/images/generations", None, {"Allow": "POST"})

    @router.get("/v1/images/{image_id}", name="image")
    async def image(image_id: str):
        if not valid_id(image_id):
            return error(400, "image id must be 32 hex characters", "image_id")
        kept = ctx.images.get(image_id, time.monotonic())
        if kept is None and ctx.peer_image is not None:
            kept = await ctx.peer_image(image_id)
        if kept is None:
            return error(404, f"image {image_id} not found or expired", "image_id")
        return Response(kept[0], media_type=kept[1])

    return router
