"""The selector on the live clock (``policy.selector``, ``+select``): every period, a copy of
the scheduler is kept on the event loop, and the window's replays run on a thread, within a
CPU budget, so that serving (arrivals, the GPUs' steps) never waits for them; the re-price
waits, as the simulator's comes after its selection.

The budget (``--select-cpu``, a share of one core, default 10%) is counted in the thread CPU
the replays took against the wall time since the server started: a selection due while the
replays have used their share is skipped, not queued (a late choice is a choice for traffic
that has passed); so is one whose re-plan tick a long selection overran (the re-plan loop
keeps to its grid).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from promptserve.policy import Policy, Setting
from promptserve.policy.contract import Ask, Scheduler, Work
from promptserve.policy.selector import Choice, Selector, candidates, outcome_quality
from promptserve.policy.step import StepScheduler
from promptserve.policy.types import Outcome
from promptserve.quality import QualityModel

log = logging.getLogger(__name__)

DEFAULT_CPU_SHARE = 0.10


@dataclass
class SelectionStats:
    """What ``/metrics`` and the dashboard show of the selector."""

    chosen: str = "price"
    scores: dict[str, float] = field(default_factory=dict)  # the last selection's replays
    selections: int = 0
    switches: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"budget": 0})
    cpu_s: float = 0.0  # thread CPU of every selection's replays
    candidates: tuple[str, ...] = ()


class LiveSelection:
    def __init__(
        self,
        sched: StepScheduler,
        value: Callable[[Outcome], float],
        feature_cache: bool,
        cpu_share: float = DEFAULT_CPU_SHARE,
        started_s: float = 0.0,
    ) -> None:
        if not 0.0 < cpu_share <= 1.0:
            raise ValueError(f"select CPU share must be in (0, 1], got {cpu_share}")
        cands = candidates(sched.config, feature_cache)
        self.selector = Selector(cands, value)
        self.cpu_share, self.started_s = cpu_share, started_s
        self.stats = SelectionStats(chosen=cands[0].name, candidates=tuple(c.name for c in cands))

    def observe(self, now: float, ask: Ask) -> None:
        self.selector.observe(now, ask)

    def due(self, now: float) -> bool:
        return self.selector.due(now)

    @classmethod
    def of(
        cls,
        policy: Policy,
        sched: Scheduler,
        setting: Setting,
        quality: QualityModel,
        total_steps: int,
        cpu_share: float,
        started_s: float,
    ) -> LiveSelection | None:
        """The runtime's selection, where its policy has ``+select`` (step-level only)."""
        if not policy.select or not isinstance(sched, StepScheduler):
            return None
        value = functools.partial(outcome_quality, quality, setting.interval_q, total_steps)
        feature_cache = setting.profiles[0].feature_r_max > 1
        return cls(sched, value, feature_cache, cpu_share, started_s)

    async def tick(
        self,
        now: float,
        sched: StepScheduler,
        running: Callable[[], dict[int, Work]],
        replans: tuple[float, float, float] | None,
        clock: Callable[[], float],
    ) -> Choice | None:
        """One selection, as the simulator makes it before a re-price: the window taken on
        the loop, the replays on a thread (serving goes on meanwhile), the switch and the
        copy kept for a later window back on the loop, at ``clock()``. ``running``: the work
        the GPUs were handed and have not reported, read when the copy is made."""
        stats = self.stats
        if stats.cpu_s > self.cpu_share * max(now - self.started_s, 0.0):
            stats.skipped["budget"] += 1
            self.selector.next_at = now + self.selector.config.period_s
            self.selector.keep(now, sched, running())
            return None
        window = self.selector.window(now)
        choice = None
        if window is not None:
            choice, cpu = await asyncio.to_thread(self._score, now, window, replans)
            stats.cpu_s += cpu
            self.selector.adopt(choice, sched)
            stats.selections += 1
            stats.switches += int(choice.switched)
            stats.chosen, stats.scores = choice.chosen, dict(choice.scores)
            if choice.switched:
                log.info("selector: serving by %s (replayed %s)", choice.chosen, choice.scores)
        self.selector.keep(clock(), sched, running())
        return choice

    def _score(self, now, window, replans) -> tuple[Choice, float]:  # noqa: ANN001
        t0 = time.thread_time()
        choice = self.selector.score(now, window, replans)
        return choice, time.thread_time() - t0
