"""One call for any work a scheduler hands out: ``execute(workers, gpu, work, prepared)``.

A batch runs whole (``Workers.run``); a step-level boundary's work runs as one worker call
(``Workers.advance``): the cancelled leave, the joiners join, the moved members take their
interval, then steps up to the next boundary. Either way what comes back is the scheduler's
``Report`` and the results of whoever finished. The runtime prepares the items (start latents
read on its cache thread) and owns the answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from promptserve.engine.base import GenerationItem, GenerationResult, Paused
from promptserve.policy.contract import BatchWork, Report, Work
from promptserve.workers.base import OnStep, StoreRefs, Workers
from promptserve.workers.steps import StepCall

BATCH_TIMEOUT_FACTOR = 10.0  # a batch running this many times its predicted latency ...
BATCH_TIMEOUT_FLOOR_S = 60.0  # ... and at least this long is given up on (as if lost)
# a durable background job's members are written down every this many steps (a latent's copy
# off the device and a row in the job store): a crash then loses at most this much of a run
# (a fifth of 50 steps), at a write per member every 10 steps (about 0.5 s apart on the SDXL
# reference's widest step)
CHECKPOINT_STEPS = 10


@dataclass
class Prepared:
    """What the runtime readied for a work."""

    items: dict[int, GenerationItem]  # per job that starts in it (``policy.contract.starts``)
    refs: dict[int, StoreRefs] | None = None  # per such job, for workers on the shared store
    cancels: set[int] = field(default_factory=set)  # step-level: dropped before anything runs
    most_steps: int | None = None  # step-level: stop by then (a member hears each step)
    interrupt: threading.Event | None = None  # step-level: set, it stops after this step
    on_step: OnStep | None = None  # a batch's per-step callback (streams, cancels)
    # step-level: told the members paused at the boundary as soon as they are written down
    # (a resume on another GPU waits for them, not for this call's steps)
    on_paused: Callable[[dict[int, Paused]], None] | None = None
    checkpoints: set[int] = field(default_factory=set)  # written down every CHECKPOINT_STEPS


@dataclass
class Executed:
    report: Report
    results: dict[int, GenerationResult]  # whoever finished, by job id
    steps_left: dict[int, int] = field(default_factory=dict)  # step-level: who runs on
    previews: dict[int, bytes] = field(default_factory=dict)  # step-level: asked-for previews
    paused: dict[int, Paused] = field(default_factory=dict)  # step-level: written down
    snapshots: dict[int, Paused] = field(default_factory=dict)  # step-level: checkpoints


def timeout_s(work: Work) -> float | None:
    """How long a work may take before its GPU counts as stuck (None: no bound; a step-level
    call is bounded by its steps)."""
    if isinstance(work, BatchWork):
        return max(BATCH_TIMEOUT_FACTOR * (work.until_s - work.start_s), BATCH_TIMEOUT_FLOOR_S)
    return None


async def execute(workers: Workers, gpu: int, work: Work, prepared: Prepared) -> Executed:
    if isinstance(work, BatchWork):
        ids = [job.id for job in work.jobs]
        items = [prepared.items[i] for i in ids]
        refs = [prepared.refs[i] for i in ids] if prepared.refs is not None else None
        results = await workers.run(gpu, items, prepared.on_step, refs)  # type: ignore[arg-type]
        return Executed(Report(), dict(zip(ids, results, strict=True)))
    joining = [m.job.id for m in work.joins if m.job.id in prepared.items]  # not cancelled
    joins = [(i, prepared.items[i]) for i in joining]
    refs = [prepared.refs[i] for i in joining] if prepared.refs is not None else None
    steps = work.steps if prepared.most_steps is None else min(work.steps, prepared.most_steps)
    retimes = {m.job.id: m.r for m in work.retimed}
    pauses = set(work.pauses) - prepared.cancels
    call = StepCall(
        joins, prepared.cancels, max(steps, 1), prepared.interrupt, retimes, refs, pauses,
        prepared.checkpoints, CHECKPOINT_STEPS if prepared.checkpoints else 0,
    )  # fmt: skip
    started: dict = {}
    paused: dict = {}
    if (joins and work.start_s > work.at_s) or pauses:
        # its joiners encode and load before the first step: a join placed meanwhile joins
        # them there, a boundary before any step (as the scheduler times it), not a step on;
        # the members it pauses are written down before any step, for whoever resumes them
        joined = await workers.advance(gpu, replace(call, steps=0))
        started, paused = joined.started, joined.paused
        if prepared.on_paused is not None:
            prepared.on_paused(paused)
        if prepared.interrupt is not None and prepared.interrupt.is_set():
            report = Report(steps=0, started=tuple(started.items()))
            return Executed(report, {}, dict(joined.steps_left), {}, paused)  # type: ignore[arg-type]
        call = replace(call, joins=(), cancels=set(), refs=None, pauses=set(), retimes={})
    done = await workers.advance(gpu, call)
    finished = dict(done.finished)
    report = Report(
        steps=done.ran,
        started=tuple((started or done.started).items()),  # type: ignore[arg-type]
        finished=tuple(finished),  # type: ignore[arg-type]
    )
    paused = paused or done.paused
    return Executed(
        report, finished, dict(done.steps_left), dict(done.previews), paused, done.snapshots,  # type: ignore[arg-type]
    )  # fmt: skip
