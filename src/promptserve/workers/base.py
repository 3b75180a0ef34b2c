"""Where the runtime's work runs: engine workers behind one small interface.

The scheduler owns the decisions; a ``Workers`` owns the execution of one batch (``run``) or
one step (``advance``) on one GPU, and ``execute`` turns a scheduler's ``Work`` into those
calls and their ``Report``. ``LocalWorkers`` (``local.py``) runs each GPU's work on its own
in-process engine and thread; ``promptserve.distributed.RayWorkers`` runs it on Ray Serve
replicas. A worker that vanishes mid-batch raises ``WorkerLost``: the scheduler places the
work again instead of failing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from promptserve.engine.base import GenerationItem, GenerationResult, Guidance
from promptserve.profile import Profile
from promptserve.workers.steps import StepCall, StepDone

# called once per denoising step, with the previews of that step by row when any were asked
# for (``GenerationItem.previews``); raising stops the batch
OnStep = Callable[..., None]
Items = Sequence[GenerationItem]
Results = list[GenerationResult]


@dataclass(frozen=True)
class StoreRefs:
    """For workers that read and write the shared latent store themselves: the cached latent a
    run starts from (None: from noise), and the entry its captured latents are written to."""

    start_key: str | None
    tenant: str
    entry_id: int | None  # None: nothing to write (an exact repeat adds nothing to the cache)
    # the cache entry ``start_key`` belongs to, pinned against eviction until the run has read it
    pinned: int | None = None


Refs = Sequence[StoreRefs] | None  # one per item, for workers on the shared store


class WorkerLost(Exception):
    """The worker running a batch is gone (process died, node lost): the batch did not run."""

    def __init__(self, gpu: int, reason: str) -> None:
        super().__init__(f"worker {gpu} lost: {reason}")
        self.gpu = gpu


class Workers(Protocol):
    name: str
    total_steps: int
    levels: tuple[int, ...]
    profile: Profile
    count: int
    shared_store: bool  # True: runs take StoreRefs and move latents through the store
    speedup: float  # the engines run this many times faster than ``profile`` (modelled only)
    guidance: Guidance  # what a request's guidance scale means for the model, and its range
    edit_family: str  # how an edit's strength becomes its start step (``strength.start_step``)
    native: tuple[int, int]  # the model's own (width, height): a look without a size
    sizes: tuple[tuple[int, int], ...]  # (width, height) served; the first is ``auto``'s
    adapters: tuple[str, ...]  # the LoRA adapters a request may name

    async def run(self, gpu: int, items: Items, on_step: OnStep, refs: Refs = None) -> Results: ...

    async def advance(self, gpu: int, call: StepCall) -> StepDone:
        """Step-level serving: one boundary (cancels leave, joins join, retimes re-interval
        running members) and one step, or up to ``call.steps`` where the workers can stop at
        its interrupt (``steps.advance``); the answer's ``ran`` says how many ran."""
        ...

    def prepare_steps(self) -> None:
        """Build what ``advance`` runs, at start-up rather than in the first request."""
        ...

    async def set_levels(self, levels: Sequence[int | None]) -> None: ...

    async def alive(self) -> list[bool]: ...
