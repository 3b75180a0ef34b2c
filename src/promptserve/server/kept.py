"""What the server keeps for a tenant after answering (finished jobs, images behind links):
bounded per tenant by count, bytes and age, so that one tenant's churn never pushes out
another's results, and nothing stays forever."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class Bounds:
    count: int  # items per tenant
    bytes: int  # their sizes summed, per tenant
    ttl_s: float  # seconds an item is kept after it is put


class TenantShelf(Generic[V]):
    """Items by id, each a tenant's; a tenant over its bounds loses its own oldest first, and
    an item older than ``ttl_s`` is gone. Time is an argument (seconds, any monotonic clock)."""

    def __init__(self, bounds: Bounds, on_drop: Callable[[str], None] | None = None) -> None:
        self.bounds = bounds
        self.on_drop = on_drop  # told of every item that goes (pushed out, expired or popped)
        self._items: dict[str, tuple[str, float, int, V]] = {}  # id -> tenant, put at, size
        self._order: dict[str, OrderedDict[str, None]] = {}  # tenant -> its ids, oldest first
        self._bytes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, tenant: str, item_id: str, value: V, now: float, size: int = 0) -> None:
        self.expire(now)
        self._items[item_id] = (tenant, now, size, value)
        self._order.setdefault(tenant, OrderedDict())[item_id] = None
        self._bytes[tenant] = self._bytes.get(tenant, 0) + size
        order = self._order[tenant]
        while len(order) > self.bounds.count or (
            self._bytes[tenant] > self.bounds.bytes and len(order) > 1
        ):
            self.pop(next(iter(order)))

    def get(self, item_id: str, now: float) -> tuple[str, V] | None:
        """The item's tenant and value, or None: never kept, pushed out or expired."""
        kept = self._items.get(item_id)
        if kept is None:
            return None
        if now - kept[1] > self.bounds.ttl_s:
            self.pop(item_id)
            return None
        return kept[0], kept[3]

    def pop(self, item_id: str) -> V | None:
        kept = self._items.pop(item_id, None)
        if kept is None:
            return None
        tenant, _, size, value = kept
        order = self._order[tenant]
        del order[item_id]
        self._bytes[tenant] -= size
        if not order:
            del self._order[tenant], self._bytes[tenant]
        if self.on_drop is not None:
            self.on_drop(item_id)
        return value

    def expire(self, now: float) -> int:
        """Drop every item past its age; how many went. Each tenant's ids are in put order, so
        this reads only the expired ones and one more per tenant."""
        gone = 0
        for order in list(self._order.values()):
            for item_id in list(order):
                if now - self._items[item_id][1] <= self.bounds.ttl_s:
                    break
                self.pop(item_id)
                gone += 1
        return gone

    def held_by(self, tenant: str) -> tuple[int, int]:
        """(items, bytes) the tenant holds now."""
        return len(self._order.get(tenant, ())), self._bytes.get(tenant, 0)
