"""Images answered by URL (``response_format="url"``): kept in memory for a while, under an
unguessable id (a capability URL: whoever holds it may fetch it, see docs/security.md)."""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict

IMAGE_ID = re.compile(r"[0-9a-f]{32}")  # matched whole (fullmatch): "$" admits a final "\n"
KEPT_IMAGES = 512  # the most kept; the oldest go first
IMAGE_TTL_S = 600.0


def new_id() -> str:
    """128 random bits as 32 hex characters (a uuid4 carries only 122): image and job ids."""
    return secrets.token_hex(16)


def valid_id(text: str) -> bool:
    return IMAGE_ID.fullmatch(text) is not None


class ImageStore:
    def __init__(self, keep: int = KEPT_IMAGES, ttl_s: float = IMAGE_TTL_S) -> None:
        self.keep, self.ttl_s = keep, ttl_s
        self._images: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()

    def put(self, image: bytes, now: float, media_type: str = "image/png") -> str:
        image_id = new_id()
        self._images[image_id] = (now, image, media_type)
        while len(self._images) > self.keep:
            self._images.popitem(last=False)
        return image_id

    def get(self, image_id: str, now: float) -> tuple[bytes, str] | None:
        """The image and its media type, or None when it was never kept, was pushed out, or
        has expired."""
        kept = self._images.get(image_id)
        if kept is None or now - kept[0] > self.ttl_s:
            self._images.pop(image_id, None)
            return None
        return kept[1], kept[2]
