"""A served request's answer: what it ran, and its progress as its steps run."""

from __future__ import annotations

from typing import Protocol

from promptserve.engine.base import GenerationResult, Guidance
from promptserve.errors import Cancelled
from promptserve.policy.types import Outcome, Setting
from promptserve.quality import QualityModel, served_quality
from promptserve.server.requests import Counters, Pending, Served
from promptserve.workers.base import Workers
from promptserve.workers.execute import Executed


class Serving(Protocol):
    """What an answer reads of the runtime that serves it."""

    quality: QualityModel
    setting: Setting
    workers: Workers
    guidance: Guidance


def served(
    p: Pending,
    result: GenerationResult,
    started: float,
    now: float,
    outcome: Outcome,
    counters: Counters,
    rt: Serving,
) -> Served:
    """A request its run finished, counted (on time or late, its stages, its hit), and the
    answer it gets, with its predicted quality."""
    counters.by_outcome["late" if now > p.deadline_s else "served"] += 1
    counters.stage("queue", max(0.0, started - p.queued_at))
    counters.stage("run", now - started)
    counters.cache_hits += int(p.hit is not None and result.k > 0)
    quality = served_quality(
        rt.quality, rt.setting.interval_q, rt.workers.total_steps, p.k_opt, result.k,
        outcome.interval, outcome.earlier, None if p.edit is None else result.k,
    )  # fmt: skip
    guidance = rt.guidance
    scale = None  # the guidance scale it ran at (None: the model has no guidance input)
    if guidance.kind != "none":
        scale = guidance.default if p.look.guidance is None else p.look.guidance
    return Served(
        result,
        result.k,
        p.hit.similarity if p.hit else None,
        quality,
        started - p.arrival,
        now - started,
        p.k_opt,
        p.seed,
        scale,
        p.look.lora,
        outcome.interval,
        outcome.earlier,
        p.edit,
    )


def deliver(p: Pending, answer: Served) -> None:
    """The answer to its caller, or Cancelled where the caller asked meanwhile (the result is
    discarded; its latents still go to the cache)."""
    if p.future.done():
        return
    if p.handle is not None and p.handle.cancelled:
        p.future.set_exception(Cancelled("cancelled while denoising"))
    else:
        p.future.set_result(answer)


def report_steps(pending: dict[int, Pending], executed: Executed, total_steps: int) -> None:
    """Each member's own step after a step-level call (those that finished are at the last),
    and the previews asked for; a batch told its callers as it ran."""
    for job_id, png in executed.previews.items():
        p = pending.get(job_id)
        if p is not None and p.handle is not None:
            p.handle.emit("preview", {"png": png})
    if not executed.steps_left and not executed.report.finished:
        return
    left_of = executed.steps_left | dict.fromkeys(executed.report.finished, 0)
    for job_id, left in left_of.items():
        p = pending.get(job_id)
        if p is not None and p.handle is not None and not p.handle.quiet:
            p.handle.emit("step", {"step": total_steps - left, "of": total_steps})
