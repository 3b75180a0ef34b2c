"""Plain data that crosses module boundaries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Request:
    """One text-to-image request as a workload or the server produces it."""

    id: int
    arrival_s: float  # seconds on the driver's clock (virtual or wall)
    prompt: str
    tenant: str  # cache namespace; tenants never share cache entries
    deadline_s: float  # absolute: the time by which the answer must be out
    shape: int = 0  # its size, as an index into the served sizes (0: the model's own)
    adapters: tuple[int, ...] = ()  # the LoRA adapters it names, as ids
    strength: float | None = (
        None  # an edit's strength (``promptserve.strength``); None: a generation
    )
    batch: bool = False  # background work (``priority: batch``): on what interactive work leaves

    @property
    def slo_s(self) -> float:
        """Seconds the request may take end to end."""
        return self.deadline_s - self.arrival_s
