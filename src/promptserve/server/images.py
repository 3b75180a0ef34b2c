"""Images answered by URL (``response_format="url"``): kept in memory for a while, under an
unguessable id (a capability URL: whoever holds it may fetch it, see docs/security.md), within
per-tenant bounds (``kept.TenantShelf``) so that one tenant's images never push out another's.

With several ingress replicas on Ray an id's first two hex digits name the replica that holds
it (``prefix``), so a replica asked for another's image knows whom to ask."""

from __future__ import annotations

import re
import secrets

from promptserve.server.kept import Bounds, TenantShelf

IMAGE_ID = re.compile(r"[0-9a-f]{32}")  # matched whole (fullmatch): "$" admits a final "\n"
IMAGE_BOUNDS = Bounds(count=256, bytes=256 << 20, ttl_s=600.0)  # per tenant


def new_id(prefix: str = "") -> str:
    """128 random bits as 32 hex characters (a uuid4 carries only 122), the first ones
    replaced by ``prefix`` where one is given: image and job ids."""
    return prefix + secrets.token_hex(16)[len(prefix) :]


def valid_id(text: str) -> bool:
    return IMAGE_ID.fullmatch(text) is not None


class ImageStore:
    def __init__(self, bounds: Bounds = IMAGE_BOUNDS, prefix: str = "") -> None:
        self.prefix = prefix
        self._shelf: TenantShelf[tuple[bytes, str]] = TenantShelf(bounds)

    def put(
        self,
        tenant: str,
        image: bytes,
        now: float,
        media_type: str = "image/png",
        image_id: str | None = None,  # a restored job's link keeps its id
    ) -> str:
        image_id = image_id or new_id(self.prefix)
        self._shelf.put(tenant, image_id, (image, media_type), now, len(image))
        return image_id

    def get(self, image_id: str, now: float) -> tuple[bytes, str] | None:
        """The image and its media type, or None when it was never kept, was pushed out, or
        has expired."""
        kept = self._shelf.get(image_id, now)
        return None if kept is None else kept[1]
