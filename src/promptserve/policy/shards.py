"""A sharded control plane: tenants on a consistent-hash ring, each shard a step-level scheduler
over its own slice of the GPUs, and a slow global controller that moves GPUs between slices.

One scheduler over thousands of GPUs is one process's work at every arrival and boundary; a
shard's is its slice's. What sharding costs is multiplexing: a burst of one shard's tenants
cannot use another's idle GPUs until the controller moves some. The controller reads each
shard's load estimate on its period and moves GPUs towards a split proportional to the step
work each asks for. A GPU moves by draining: it takes no one new where it was, and joins its
new shard once its last member has left (its members' progress is never lost).

Tenants never share cache entries, so a tenant's whole cache partition lives on its shard;
the ring keeps most tenants where they were when shards are added or removed.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from promptserve.policy.contract import Arrival, Ask, LoadSnapshot, Replan, Report, Schedule, Work
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.step import StepConfig, StepGpu, StepScheduler
from promptserve.policy.types import Demand, Job, Outcome, Status

VNODES = 64  # points per shard on the ring: the load split's spread falls as 1/sqrt(VNODES)
MEMO_TENANTS = 4096  # tenants whose shard is remembered (a lookup is a hash and a bisection)


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ShardRing:
    """Consistent hashing of tenants onto shards (Karger et al.): each shard owns ``vnodes``
    points of a 64-bit ring, a tenant goes to the owner of the first point at or after its
    hash. Adding a shard moves about 1/(n+1) of the tenants, all of them to the new shard."""

    def __init__(self, n_shards: int, vnodes: int = VNODES) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        points = sorted(
            (_point(f"shard-{s}#{v}"), s) for s in range(n_shards) for v in range(vnodes)
        )
        self.n_shards = n_shards
        self._keys = [p for p, _ in points]
        self._owners = [s for _, s in points]
        self._memo: dict[str, int] = {}

    def shard_of(self, tenant: str) -> int:
        shard = self._memo.get(tenant)
        if shard is None:
            i = bisect.bisect_left(self._keys, _point(tenant)) % len(self._keys)
            shard = self._owners[i]
            if len(self._memo) >= MEMO_TENANTS:  # bounded whatever callers send
                self._memo.clear()
            self._memo[tenant] = shard
        return shard

    def spread(self, key: str) -> int:
        """A shard for something that belongs to no tenant (a request id): uniform."""
        return _point(key) % self.n_shards


@dataclass(frozen=True)
class ShardLoad:
    """One shard's load as its estimator reads it."""

    rate_qpm: float
    mean_steps: float  # steps a request asks for at its K_opt (a miss: every step)
    arrivals: int  # in the estimator's window: how noisy the rate is

    @property
    def work(self) -> float:
        return self.rate_qpm * self.mean_steps


def shard_load(demand: Demand, levels: Sequence[int], total_steps: int, arrivals: int) -> ShardLoad:
    steps = sum(share * (total_steps - k) for share, k in zip(demand.mix, levels, strict=True))
    return ShardLoad(demand.rate_qpm, steps, arrivals)


def gpu_targets(loads: Sequence[ShardLoad], total: int, minimum: int = 1) -> list[int]:
    """GPUs per shard in proportion to the step work it asks for, at least ``minimum`` each,
    summing to ``total`` (largest remainders). With no load anywhere, an even split."""
    n = len(loads)
    if total < minimum * n:
        raise ValueError(f"{total} GPUs cannot give {n} shards {minimum} each")
    work = [max(load.work, 0.0) for load in loads]
    spare = total - minimum * n
    whole = sum(work)
    shares = [spare * w / whole for w in work] if whole > 0 else [spare / n] * n
    out = [minimum + math.floor(s) for s in shares]
    order = sorted(range(n), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def plan_moves(
    counts: Sequence[int], targets: Sequence[int], loads: Sequence[ShardLoad]
) -> list[tuple[int, int]]:
    """(from shard, to shard) for each GPU to move this period. A shard within one standard
    deviation of its target is left alone: its share of the work is estimated from
    ``arrivals`` requests, so its target is uncertain by about target / sqrt(arrivals), and
    a move costs a drain (the GPU takes no one until its members have left)."""

    def slack(i: int) -> float:
        return max(1.0, targets[i] / math.sqrt(max(loads[i].arrivals, 1)))

    over = [i for i in range(len(counts)) if counts[i] - targets[i] > slack(i)]
    under = [i for i in range(len(counts)) if targets[i] - counts[i] > slack(i)]
    give = {i: counts[i] - targets[i] for i in over}
    take = {i: targets[i] - counts[i] for i in under}
    moves: list[tuple[int, int]] = []
    for dst in sorted(under, key=lambda i: -take[i]):
        for src in sorted(over, key=lambda i: -give[i]):
            while take[dst] > 0 and give[src] > 0:
                moves.append((src, dst))
                take[dst] -= 1
                give[src] -= 1
    return moves


class ShardedSteps:
    """``n_shards`` step-level schedulers over one pool of GPUs, tenants routed by the ring.
    Every shard holds every GPU's slot (so indices are global and a GPU can move), with the
    GPUs it does not own down; they share one ``Boundaries``, so a GPU's timing moves with it.
    It keeps the contract of one scheduler (``policy.contract``): ``intake`` routes by
    ``tenant_of``, ``update`` goes to the GPU's owner, ``replan`` prices each shard from its own
    estimate and, every ``every``-th time, runs the global controller."""

    def __init__(
        self,
        make: Callable[[], StepScheduler],
        n_gpus: int,
        n_shards: int,
        tenant_of: Callable[[int], str],
        every: int = 1,  # re-plans per controller run
    ) -> None:
        if n_gpus < n_shards:
            raise ValueError(f"{n_shards} shards need at least as many GPUs, got {n_gpus}")
        self.ring = ShardRing(n_shards)
        self.tenant_of = tenant_of
        self.shards = [make() for _ in range(n_shards)]
        first = self.shards[0]
        self.boundaries = first.boundaries
        for s, shard in enumerate(self.shards):
            shard.boundaries, shard.queue_key = self.boundaries, s
        self.config, self.profile = first.config, first.profile
        self.owner = [g * n_shards // n_gpus for g in range(n_gpus)]
        self.owned: list[set[int]] = [set() for _ in range(n_shards)]
        for g, s in enumerate(self.owner):
            self.owned[s].add(g)
            for other, shard in enumerate(self.shards):
                if other != s:
                    shard.set_up(g, False)
        self.gpus: list[StepGpu] = [self.shards[s].gpus[g] for g, s in enumerate(self.owner)]
        self.draining: dict[int, int] = {}  # GPU -> the shard it moves to once empty
        self.shard_of_job: dict[int, int] = {}
        self.handovers: list[tuple[float, int, int, int]] = []  # (time, GPU, from, to)
        # the contract's estimator; each shard's own (told of its arrivals) drives its price
        # and the controller, so the driver's estimate is only ever shard 0's
        self.estimator: LoadEstimator = first.estimator  # type: ignore[assignment]
        self.every, self.ticks = every, 0
        self.start_s: float | None = None  # the first arrival: the shards' estimates start there
        # ``+select``: the shard whose traffic the selector replays, and a still copy of each
        # slot it does not own (a replay never touches a GPU that is down in its shard)
        self.sampled = 0
        self._still: dict[int, StepGpu] = {}

    @property
    def price(self) -> float:
        return max(shard.price for shard in self.shards)

    # -- the driver's calls --------------------------------------------------------------------

    def intake(self, now: float, ask: Ask) -> Arrival:
        if self.start_s is None:
            self.start_s = now
        s = self.ring.shard_of(self.tenant_of(ask.id))
        self.shard_of_job[ask.id] = s
        return self.shards[s].intake(now, ask)

    def schedule(self, now: float) -> Schedule:
        for shard in self.shards:
            if shard.queue:
                for gpu in shard.idle_while_waiting():
                    self.boundaries.idle(gpu, now)
        return self.boundaries.hand_out()

    def update(self, now: float, gpu: int, report: Report) -> list[Outcome]:
        out = self.shards[self.owner[gpu]].update(now, gpu, report)
        if gpu in self.draining and self.gpus[gpu].count == 0:
            # free once its leavers are decoded
            served = [o.time_s for o in out if o.status == Status.SERVED and o.gpu == gpu]
            self._hand_over(gpu, max(served, default=now))
        return out

    def replan(self, now: float, demand: Demand, force: bool = False) -> Replan:
        """Each shard's price from its own load estimate and its own GPUs; the first time
        (before any arrival is seen), from ``demand`` (the whole cluster's forecast) split by
        the shards' GPUs; every ``every``-th time after, the global controller's moves too."""
        start = now if self.start_s is None else self.start_s
        for s, shard in enumerate(self.shards):
            if self.ticks == 0:
                share = len(self.owned[s]) / len(self.gpus)
                part = replace(demand, rate_qpm=demand.rate_qpm * share, backlog=())
            else:
                assert shard.estimator is not None
                part = shard.estimator.estimate(now, start)
            shard.reprice(part, shard.slo_s)
        if self.ticks % self.every == 0 and self.ticks > 0:
            self.control(now, start)  # its handovers are in ``handovers``
        self.ticks += 1
        return Replan(price=self.price)

    def set_up(self, gpu: int, up: bool, now: float) -> list[Job]:
        return self.shards[self.owner[gpu]].set_up(gpu, up, now)

    # -- the selector (``+select``) --------------------------------------------------------------

    def use(self, config: StepConfig) -> None:
        """Every shard serves by ``config`` from now on (the selector's choice is one rule)."""
        for shard in self.shards:
            shard.use(config)

    def sample(self, running: dict[int, Work]) -> tuple[StepScheduler, dict[int, Work]]:
        """The shard the selector replays, and the work its own GPUs run. One shard and not
        every one: a selection replays its window under each candidate, several times what
        serving it took, and the ring spreads tenants so that shards see alike traffic; so the
        cost of choosing stays one shard's at any number of GPUs."""
        s = self.sampled
        return self.shards[s], {g: w for g, w in running.items() if self.owner[g] == s}

    def in_sample(self, ask: Ask) -> bool:
        return self.ring.shard_of(self.tenant_of(ask.id)) == self.sampled

    def copier(self, state: object) -> object:
        """A copy of the sampled shard's state (``sample``) that shares one still copy of each
        slot the shard does not own instead of copying it again: a shard holds every GPU's
        slot, and copying 4,096 of them took 220 ms against 4 ms for 64."""
        shard = self.shards[self.sampled]
        memo: dict[int, object] = {}
        for g, live in enumerate(shard.gpus):
            if self.owner[g] != self.sampled and not live.up:
                still = self._still.get(g)
                if still is None:
                    still = self._still[g] = copy.deepcopy(live)
                memo[id(live)] = memo[id(still)] = still
        return copy.deepcopy(state, memo)

    def backlog_s(self, now: float) -> float:
        return min(shard.backlog_s(now) for shard in self.shards)

    def control(self, now: float, start_s: float) -> list[tuple[int, int]]:
        """The global controller: GPUs towards each shard's share of the step work. Returns
        the moves begun (from, to); an idle GPU moves at once, a busy one once drained."""
        total_steps = self.profile.total_steps
        loads = []
        for shard in self.shards:
            est = shard.estimator
            assert est is not None
            demand = est.estimate(now, start_s)
            loads.append(shard_load(demand, shard.spec.levels, total_steps, est.seen))
        counts = [
            len(self.owned[s]) - self._leaving(s) + self._arriving(s)
            for s in range(len(self.shards))
        ]
        moves = plan_moves(counts, gpu_targets(loads, len(self.gpus)), loads)
        for src, dst in moves:
            g = self._pick(src)
            if g is None:
                continue
            self.shards[src].drain(g)
            self.draining[g] = dst
            if self.gpus[g].count == 0:
                self._hand_over(g, now)
        return moves

    def pending(self) -> int:
        return sum(shard.pending() for shard in self.shards)

    def snapshot(self) -> LoadSnapshot:
        shots = [shard.snapshot() for shard in self.shards]
        per_level = {k: sum(s.per_level[k] for s in shots) for k in shots[0].per_level}
        queued = {k: sum(s.queued[k] for s in shots) for k in shots[0].queued}
        inflight = tuple(self.gpus[g].count for g in range(len(self.gpus)))
        return LoadSnapshot(
            queued, per_level, inflight, len(self.gpus), sum(len(o) for o in self.owned)
        )

    def remove(self, job_id: int) -> Job | None:
        s = self.shard_of_job.get(job_id)
        return None if s is None else self.shards[s].remove(job_id)

    # -- moving GPUs ---------------------------------------------------------------------------

    def _leaving(self, s: int) -> int:
        return sum(1 for g in self.draining if self.owner[g] == s)

    def _arriving(self, s: int) -> int:
        return sum(1 for dst in self.draining.values() if dst == s)

    def _pick(self, s: int) -> int | None:
        """The GPU of shard ``s`` that drains first: the one with the fewest members."""
        shard = self.shards[s]
        for bucket in shard.cluster.by_count:
            free = [g for g in bucket if g not in self.draining]
            if free:
                return min(free)
        return None

    @property
    def moved(self) -> int:
        return len(self.handovers)

    def _hand_over(self, g: int, now: float) -> None:
        dst = self.draining.pop(g)
        self._still.pop(g, None)  # it changes hands: its slot in the sampled shard may too
        self.handovers.append((now, g, self.owner[g], dst))
        self.owned[self.owner[g]].discard(g)
        self.owner[g] = dst
        self.owned[dst].add(g)
        self.shards[dst].set_up(g, True)
        self.gpus[g] = self.shards[dst].gpus[g]
