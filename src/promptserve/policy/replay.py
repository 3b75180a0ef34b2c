"""A scheduler replayed on a virtual clock: the contract of ``contract.py`` driven by nothing
but the times its own work carries, as the simulator's GPUs run it.

The selector (``selector.py``) replays the recent arrivals, as the scheduler saw them, from a
copy of the scheduler's state at the window's start; both clocks run it, so it lives here
(``server/`` imports nothing from ``sim/``). It knows no cache: each ``Ask`` carries the K_opt
and neighbour its arrival was given.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from promptserve.policy.contract import Ask, Scheduler, Work, ran
from promptserve.policy.types import Outcome, Status

_DONE, _ARRIVAL, _REPLAN, _WAKE = 0, 1, 2, 3  # at equal times: work ends, then arrivals


@dataclass(frozen=True)
class Replayed:
    """What a replay gave the arrivals it was handed."""

    value: float  # their summed quality answered in time (percent points), over their count
    in_time: int
    ended: int  # of them, ended by the replay's end (every one, unless ``horizon_s`` cut it)


def replay(
    sched: Scheduler,
    start_s: float,
    arrivals: Sequence[tuple[float, Ask]],
    value: Callable[[Outcome], float],
    replans: tuple[float, float, float] | None = None,
    horizon_s: float = math.inf,
    running: dict[int, Work] | None = None,
) -> Replayed:
    """Run ``sched`` (a copy: it is changed) from ``start_s`` over ``arrivals`` (time, ask)
    until every arrival has ended or ``horizon_s``. ``replans``: (the next re-plan's time, the
    period, the run's first arrival, which the estimator counts from), as the driver has
    them; ``value``: a served outcome's quality (percent); ``running``: the work each GPU had
    been handed and not yet reported at ``start_s`` (copied with ``sched``: the same objects)."""
    heap: list[tuple[float, int, int, object]] = []
    seq = 0

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, kind, seq, payload))

    for t, ask in arrivals:
        push(t, _ARRIVAL, ask)
    if replans is not None:
        push(max(replans[0], start_s), _REPLAN, None)
    deadline = {ask.id: ask.deadline_s for _, ask in arrivals}
    current: dict[int, Work] = dict(running or {})
    for work in current.values():
        push(work.until_s, _DONE, work)
    wakes: set[float] = set()
    total, in_time, ended = 0.0, 0, 0

    def end(outcome: Outcome) -> None:
        nonlocal total, in_time, ended
        due = deadline.get(outcome.job.id)
        if due is None:
            return  # a job in flight before the window: the same for every candidate
        ended += 1
        if outcome.status == Status.SERVED and outcome.time_s <= due + 1e-9:
            in_time += 1
            total += value(outcome)

    while heap and ended < len(deadline):
        now, kind, _, payload = heapq.heappop(heap)
        if now > horizon_s:
            break
        if kind == _ARRIVAL:
            arrival = sched.intake(now, payload)  # type: ignore[arg-type]
            if arrival.ended is not None:
                end(arrival.ended)
        elif kind == _DONE:
            work: Work = payload  # type: ignore[assignment]
            if current.get(work.gpu) is not work:
                continue  # a later work replaced it
            del current[work.gpu]
            for outcome in sched.update(now, work.gpu, ran(work)):
                end(outcome)
        elif kind == _REPLAN and replans is not None:
            sched.replan(now, sched.estimator.estimate(now, replans[2]))
            push(now + replans[1], _REPLAN, None)
        decided = sched.schedule(now)
        for outcome in decided.ended:
            end(outcome)
        for work in decided.work:
            current[work.gpu] = work
            push(work.until_s, _DONE, work)
        if decided.wake_s < math.inf and decided.wake_s not in wakes:
            wakes.add(decided.wake_s)
            push(decided.wake_s, _WAKE, None)
    return Replayed(total / max(len(deadline), 1), in_time, ended)
