"""Cache namespaces: a request looks up and writes only in its tenant's, split by everything
its image depends on besides the prompt (its look), so a neighbour is always one it could
resume from and never another tenant's."""

from __future__ import annotations

import hashlib
from typing import Protocol


class Styled(Protocol):
    """What a namespace is split by (``engine.base.Look``)."""

    negative_prompt: str
    guidance: float | None
    size: tuple[int, int] | None
    lora: tuple[tuple[str, float], ...]

    @property
    def plain(self) -> bool: ...


def cache_space(tenant: str, look: Styled) -> str:
    """The cache namespace a request looks up and writes in: its tenant's, split by look."""
    if look.plain:
        return tenant
    digest = hashlib.sha256(look.negative_prompt.encode("utf-8")).hexdigest()[:16]
    return f"{tenant}\x1flook:{digest}:{look.guidance!r}:{look.size!r}:{look.lora!r}"
