"""The step policy choosing its own rule from the traffic it serves (model-predictive control).

Which rule serves best (the price, every request at its fastest pair, every request in full)
depends on the next minutes of a deployment's own traffic, and the rules that win on one trace
lose on another. The selector replays the recent arrivals, as the scheduler saw them (K_opt,
neighbour, size, adapters, deadline), from a copy of the scheduler's state at the window's
start under each candidate (``replay.py``), and serves with the one that did best. It never
sees the future: a replay holds only arrivals already seen. Both clocks call it at their
re-plan ticks, so simulated figures include its effect.

The constants, with their reason:

* ``window_s`` = 60 s, about three SLOs of the reference: a burst that moves the choice is in
  it within a minute, and at 40 queries/minute it holds 40 requests to compare;
* ``period_s`` = 10 s, two re-prices: a choice lives through at least two prices;
* ``margin`` = 0.25 points: a switch must win by more than a replay's own noise (a request
  more or less in time in a 60 s window of 100 is about 1 point; half of that for two
  candidates that share most decisions, half again to keep the switch responsive).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from promptserve.policy.contract import Ask, Work
from promptserve.policy.replay import replay
from promptserve.policy.shards import ShardLoad
from promptserve.policy.step import StepScheduler
from promptserve.policy.step.config import StepConfig, StepSpec
from promptserve.policy.step.scheduler import Repricing
from promptserve.policy.types import BatchWork, Demand, Job, Outcome, Plan, Setting
from promptserve.quality import QualityModel, served_quality
from promptserve.steptime import StepProfile

# the frozen dataclasses of the scheduler's state: a snapshot (``copy.deepcopy``) shares them,
# as they never change, and a compiled one (``promptserve.native``) cannot be rebuilt field by
# field (every frozen dataclass of a compiled module is here: ``tests/test_native.py``)
SHARED = (
    StepProfile,
    StepConfig,
    StepSpec,
    Repricing,
    BatchWork,
    Demand,
    Job,
    Outcome,
    Plan,
    Setting,
    ShardLoad,
)
for _cls in SHARED:
    copy._deepcopy_dispatch[_cls] = copy._deepcopy_atomic  # type: ignore[attr-defined]


class Adopter(Protocol):
    """What a choice switches: a step scheduler, or every shard of a sharded one."""

    def use(self, config: StepConfig) -> None: ...


@dataclass(frozen=True)
class Candidate:
    name: str
    config: StepConfig


def candidates(base: StepConfig, feature_cache: bool) -> tuple[Candidate, ...]:
    """The price as configured, every request at its fastest pair, and with feature caching
    the price at the longest interval. Every request in full (K = 0) was a candidate and lost:
    a quiet window replays it best, then the burst that follows meets a full queue before the
    next selection (held out, steep, 2 GPUs, 3 seeds: Poisson 40 qpm 98.55 against the price's
    99.10; without it 99.10). ``+value`` (refusal by quality per step) replayed no better than
    the price and is not one (``docs/policies.md``)."""
    out = [
        Candidate("price", base),
        Candidate("fastest", replace(base, rule="max", max_r=feature_cache)),
    ]
    if feature_cache:
        out.append(Candidate("price+max-r", replace(base, max_r=True)))
    return tuple(out)


def outcome_quality(
    model: QualityModel, interval_q: Sequence[float], total_steps: int, outcome: Outcome
) -> float:
    """A served outcome's quality (percent), as both clocks' records count it and the
    selector's replays score it."""
    return served_quality(
        model, interval_q, total_steps, outcome.job.k_opt, outcome.level, outcome.interval,
        outcome.earlier, outcome.job.start,
    )  # fmt: skip


@dataclass(frozen=True)
class SelectorConfig:
    window_s: float = 60.0
    period_s: float = 10.0
    margin: float = 0.25


@dataclass(frozen=True)
class Choice:
    """One selection: when, what each candidate's replay scored, and what serves now."""

    at_s: float
    scores: dict[str, float]
    chosen: str
    switched: bool


@dataclass
class Selector:
    cands: Sequence[Candidate]
    value: Callable[[Outcome], float]  # a served outcome's quality (percent)
    config: SelectorConfig = SelectorConfig()
    current: int = 0
    next_at: float = -math.inf
    history: list[Choice] = field(default_factory=list)
    _asks: deque[tuple[float, Ask]] = field(default_factory=deque)
    # (time, (scheduler, the work its GPUs had been handed)): copies, a later window's start
    _states: deque[tuple[float, tuple[StepScheduler, dict]]] = field(default_factory=deque)
    # how a state is copied: a sharded scheduler's shard shares the slots of the GPUs it
    # does not own (``ShardedSteps.copier``)
    copier: Callable[[object], object] = copy.deepcopy

    @property
    def chosen(self) -> Candidate:
        return self.cands[self.current]

    def observe(self, now: float, ask: Ask) -> None:
        """An arrival as the scheduler was asked it."""
        self._asks.append((now, ask))

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def decide(
        self,
        now: float,
        sched: StepScheduler,
        running: dict[int, Work],
        replans: tuple[float, float, float] | None,
        serving: Adopter | None = None,
    ) -> Choice | None:
        """Replay the window under every candidate; switch ``serving`` (default ``sched``) to
        the best where it beats the one serving by ``margin``. Then keep a copy of ``sched``
        and of ``running`` (the work its GPUs were handed and have not reported) as a later
        window's start. ``replans``: the next re-plan's time, the period and the run's first
        arrival. The live runtime calls the four parts itself, the replays off its event
        loop; a sharded one replays one shard and switches every shard (``shards``)."""
        window = self.window(now)
        choice = self.score(now, window, replans) if window is not None else None
        self.adopt(choice, serving if serving is not None else sched)
        self.keep(now, sched, running)
        return choice

    def window(self, now: float) -> Window | None:
        """The state at the window's start and the arrivals since (None: nothing to replay);
        the next selection is due a period on."""
        self.next_at = now + self.config.period_s
        while len(self._states) > 1 and self._states[1][0] <= now - self.config.window_s:
            self._states.popleft()  # the newest state at or before the window's start stays
        if not self._states:
            return None
        start, state = self._states[0]
        while self._asks and self._asks[0][0] < start:
            self._asks.popleft()
        arrivals = list(self._asks)
        return Window(start, state, arrivals) if arrivals else None

    def keep(self, now: float, sched: StepScheduler, running: dict[int, Work]) -> None:
        """A copy of the scheduler and of the work its GPUs run, a later window's start."""
        self._states.append((now, self.copier((sched, running))))  # type: ignore[arg-type]

    def adopt(self, choice: Choice | None, sched: Adopter) -> None:
        """Serve by the chosen candidate from now on, where the choice switched."""
        if choice is not None and choice.switched:
            self.current = [c.name for c in self.cands].index(choice.chosen)
            sched.use(self.chosen.config)

    def score(
        self, now: float, window: Window, replans: tuple[float, float, float] | None
    ) -> Choice:
        """Each candidate's replay of ``window`` and the choice it makes (touches nothing the
        serving scheduler reads: the live runtime runs it on a thread)."""
        period = replans[1] if replans else None
        scores = {}
        first = (window.start + period, period, replans[2]) if replans and period else None
        horizon = now + self.config.window_s  # every arrival of the window ends well before
        for cand in self.cands:
            trial, running = self.copier(window.state)  # type: ignore[misc]
            trial.use(cand.config)
            scores[cand.name] = replay(
                trial, window.start, window.arrivals, self.value, first, horizon, running
            ).value
        best = max(range(len(self.cands)), key=lambda i: scores[self.cands[i].name])
        gain = scores[self.cands[best].name] - scores[self.chosen.name]
        switched = best != self.current and gain > self.config.margin
        chosen = self.cands[best].name if switched else self.chosen.name
        choice = Choice(now, scores, chosen, switched)
        self.history.append(choice)
        return choice


@dataclass(frozen=True)
class Window:
    """What a selection replays: a copy of the scheduler and of its GPUs' work at ``start``,
    and the arrivals since, as they were asked."""

    start: float
    state: tuple[StepScheduler, dict]
    arrivals: list[tuple[float, Ask]]
