"""The request-body limit, enforced on the stream (a chunked body has no Content-Length)."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException


class BodyTooLarge(StarletteHTTPException):
    param = "body"


class StreamedBodyLimit:
    """Counts the body as it streams in: a chunked request carries no Content-Length, so the
    header check alone would let any size through. Past ``limit`` bytes the read fails with 413
    (FastAPI passes an HTTPException raised while it reads the body through unchanged)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)
