"""What every route of one server shares: its runtime, stores and settings, and the answers
they give when a request cannot go on (the API's error shape)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from promptserve.edge.keys import KeyTable, tenant_for
from promptserve.engine.base import Look
from promptserve.engine.sizes import label, parse_size
from promptserve.server.images import ImageStore
from promptserve.server.metrics import Metrics
from promptserve.server.runtime import Cancelled, Dropped, LiveRuntime, Refused, Unmeetable
from promptserve.server.schemas import BATCH_DEADLINE_MS, ImageRequest, visible
from promptserve.strength import EDITS_ONLY

log = logging.getLogger(__name__)


def first_problem(errors: list) -> tuple[str, str]:
    """A validation's first error as every route words it: (the field, "field: what is
    wrong"); a list item's index and pydantic's ``body`` prefix are not part of the name."""
    first = errors[0]
    parts = [str(p) for p in first["loc"] if p != "body" and not isinstance(p, int)]
    field = ".".join(parts) or "body"
    return field, f"{field}: {first['msg']}"


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


def outcome_error(exc: BaseException) -> JSONResponse:
    """A refused or failed image as its HTTP answer."""
    if isinstance(exc, Unmeetable):
        return error(400, str(exc), "deadline_ms")
    if isinstance(exc, Refused):
        return error(429, str(exc), None, {"Retry-After": str(int(exc.retry_after_s + 0.999))})
    if isinstance(exc, Dropped):
        return error(503, str(exc), None, {"Retry-After": "1"})
    return error(500, public_message(exc))


def public_message(exc: BaseException) -> str:
    """What a client may read of a failure: the policy's own answers as they are, anything
    else (an engine's or a library's error, which can carry paths and internals) as one
    sentence, the detail going to the server's log."""
    if isinstance(exc, Refused | Unmeetable | Dropped | Cancelled):
        return str(exc)
    log.error("generation failed: %r", exc, exc_info=exc)
    return "the generation failed on the server (the detail is in its log)"


@dataclass
class Context:
    runtime: LiveRuntime
    slo_s: float  # the default deadline, seconds from arrival
    keys: KeyTable
    public_url: str | None  # image links start here; None: relative to the API root
    model_names: tuple[str, ...]  # the served id first, then its aliases: what model= matches
    metrics: Metrics = field(default_factory=Metrics)
    images: ImageStore = field(default_factory=ImageStore)
    # where an image this process does not hold may be (another ingress replica on Ray)
    peer_image: Callable[[str], Awaitable[tuple[bytes, str] | None]] | None = None

    def deadline_s(self, req: ImageRequest, job: bool = False) -> float:
        """The request's deadline, seconds from its arrival: its own, else background work's
        (hours) or the server's SLO."""
        if req.deadline_ms:
            return req.deadline_ms / 1000.0
        return BATCH_DEADLINE_MS / 1000.0 if req.batch(job) else self.slo_s

    def image_url(self, image_id: str) -> str:
        path = f"/v1/images/{image_id}"
        return self.public_url.rstrip("/") + path if self.public_url else path

    def checked_tenant(
        self, req: ImageRequest, request: Request, editing: bool = False
    ) -> str | JSONResponse:
        """The caller's tenant, or the error to answer: no valid key (401), a prompt with
        nothing to draw, an unknown size, a guidance the model cannot serve or a generation
        asked of a model that only edits (400), another model (404)."""
        tenant = tenant_for(self.keys, request.headers.get("authorization"))
        if tenant is None:
            return error(
                401, "a valid API key is required (Authorization: Bearer KEY)", "authorization"
            )
        if not visible(req.prompt):
            return error(400, "prompt: has no visible character", "prompt")
        if req.size not in (None, "auto") and req.size not in self.size_labels:
            listed = ", ".join(self.size_labels)
            return error(
                400, f"size {req.size!r} is not supported (supported: {listed} or auto)", "size"
            )
        if req.model is not None and req.model not in self.model_names:
            served = self.model_names[0]
            return error(
                404,
                f"model {req.model!r} is not served here (served: {served}); a client that "
                f"always sends {req.model!r} works once the server adds it as an alias "
                f"(serve --model-name {served} --model-name {req.model})",
                "model",
            )
        if not editing and self.runtime.workers.edit_family in EDITS_ONLY:
            return error(
                400, "prompt: this model edits images and makes none from a prompt alone: "
                "POST /v1/images/edits (or /v1/jobs/edits) with an image", "prompt",
            )  # fmt: skip
        refusal = self.runtime.workers.guidance.refusal(req.negative_prompt, req.guidance_scale)
        if refusal is not None:
            return error(400, refusal[1], refusal[0])
        refusal = self._lora_refusal(req)
        if refusal is not None:
            return error(400, refusal, "lora")
        return tenant

    def _lora_refusal(self, req: ImageRequest) -> str | None:
        names = [ref.name for ref in req.lora or ()]
        served = self.runtime.workers.adapters
        unknown = [n for n in names if n not in served]
        if unknown:
            listed = ", ".join(served) if served else "none: start with --lora-dir"
            return f"unknown LoRA adapter(s) {', '.join(map(repr, unknown))} (served: {listed})"
        if len(set(names)) < len(names):
            return "a LoRA adapter is named twice: give it once, at the scale wanted"
        slots = self.runtime.setting.profiles[0].adapter_slots
        if slots and len(names) > slots:
            return (
                f"{len(names)} LoRA adapters named, but a worker holds {slots} at once "
                "(the server's --lora-resident)"
            )
        return None

    @property
    def size_labels(self) -> list[str]:
        return [label(s) for s in self.runtime.workers.sizes]

    def size_of(self, req: ImageRequest) -> str:
        """The size served: the one asked for, or (``auto``, none) the model's own."""
        return self.size_labels[0] if req.size in (None, "auto") else req.size

    def look(self, req: ImageRequest) -> Look:
        size = parse_size(self.size_of(req))
        own = size == self.runtime.workers.native  # the model's own: the plain look's
        spec = self.runtime.workers.guidance
        lora = tuple((ref.name, ref.scale) for ref in req.lora or ())
        return spec.look(req.negative_prompt, req.guidance_scale, None if own else size, lora)
