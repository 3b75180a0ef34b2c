"""Background work in the step policy (``policy.step.background``): a batch job runs on a GPU no
interactive request holds, is paused at the step boundary where one joins and resumes later
from the step it reached; interactive admission and the price never count it; the simulator
takes a background stream (``--batch``) and reports it apart."""

import dataclasses

import pytest

from promptserve.cache.embed import HashingEmbedder
from promptserve.errors import InputError
from promptserve.policy import get_policy
from promptserve.policy.contract import Ask, Report
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.step.background import width
from promptserve.policy.types import Demand, Status
from promptserve.sim.simulator import simulate
from promptserve.steptime import step_profile
from promptserve.workload.batch import BatchMix, parse_batch, with_batch
from test_stepwise import PROFILE, QM, poisson

N = PROFILE.total_steps
CONFIG = StepConfig("price", shed=True, admission=True)


def scheduler(gpus: int = 1) -> StepScheduler:
    sched = StepScheduler(
        step_profile(PROFILE), gpus, QM.matrix(), CONFIG, LoadEstimator(PROFILE.levels)
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)
    return sched


def advance(sched: StepScheduler, now: float, until: float, ran: dict[int, int], works=()):
    """Run the GPUs' works (``works``: handed out before) to their ends up to ``until``;
    ``ran``: member-steps per job."""
    outcomes, works = [], list(works)
    while True:
        handed = sched.schedule(now).work
        pending = {w.gpu: w for w in works}
        for w in handed:
            pending[w.gpu] = w
        works = list(pending.values())
        if not works:
            return now, outcomes, works
        work = min(works, key=lambda w: w.until_s)
        if work.until_s > until:
            return now, outcomes, works
        now = work.until_s
        gpu = sched.gpus[work.gpu]
        for m in (*gpu.by_id.values(), *gpu.batch.values()):
            ran[m.job.id] = ran.get(m.job.id, 0) + work.steps
        works.remove(work)
        outcomes += sched.update(now, work.gpu, Report(steps=work.steps))


def test_the_lane_runs_the_fewest_members_that_give_nearly_the_best_rate():
    profile = step_profile(PROFILE)
    n = width(profile)
    best = max(profile.steps_per_s(b) for b in range(1, profile.max_inflight + 1))
    assert profile.steps_per_s(n) >= 0.95 * best
    assert n == 1 or profile.steps_per_s(n - 1) < 0.95 * best


def test_a_batch_job_is_paused_where_an_interactive_one_joins_and_resumes_from_its_step():
    sched, ran = scheduler(), {}
    assert sched.intake(0.0, Ask(1, 3600.0, 0, False, batch=True)).ended is None
    now, outcomes, works = advance(sched, 0.0, 2.0, ran)
    assert works  # its run of steps, not reported yet
    assert sched.gpus[0].batch and not outcomes
    # an interactive request: placed on the GPU the lane holds, it joins at the step's end
    arrival = sched.intake(now + 0.01, Ask(2, now + 21.0, 0, False))
    assert arrival.ended is None and arrival.gpu == 0
    (cut,) = sched.schedule(now + 0.01).work
    assert cut.until_s <= now + 0.01 + sched.gpus[0].seg_iter_s  # within a step of arriving
    paused_at = None
    while paused_at is None:
        now = cut.until_s
        for m in sched.gpus[0].batch.values():
            ran[m.job.id] = ran.get(m.job.id, 0) + cut.steps
        sched.update(now, 0, Report(steps=cut.steps))
        (work,) = sched.schedule(now).work or (None,)
        assert work is not None
        if work.pauses:
            paused_at = ran[1]
            assert work.pauses == (1,) and [m.job.id for m in work.joins] == [2]
            assert not sched.gpus[0].batch and 2 in sched.gpus[0].by_id
        cut = work
    # the interactive request runs alone; once it leaves, the job resumes where it stopped
    now, outcomes, _ = advance(sched, now, 1e9, ran, [cut])
    served = {o.job.id: o for o in outcomes}
    assert served[2].status == Status.SERVED and served[1].status == Status.SERVED
    assert ran[1] == N  # every step once: none lost, none run twice
    assert served[1].time_s > served[2].time_s
    assert sched.background.ledger.pauses == 1 and sched.background.ledger.resumes == 1
    assert sched.pending() == 0 and 0 < paused_at < N


def test_interactive_admission_and_the_price_never_count_the_lane():
    plain, busy = scheduler(2), scheduler(2)
    for i in range(200):  # far more background work than the GPUs do in an hour
        busy.intake(0.0, Ask(1000 + i, 3600.0, 0, False, batch=True))
    advance(busy, 0.0, 1.0, {})
    advance(plain, 0.0, 1.0, {})
    assert all(g.batch for g in busy.gpus)
    for i in range(6):
        a, b = (
            plain.intake(1.0 + i, Ask(i, 22.0 + i, 10, True)),
            busy.intake(1.0 + i, Ask(i, 22.0 + i, 10, True)),
        )
        assert a.ended == b.ended  # where it joins may differ: with a lane, joins pack
    assert busy.estimator.estimate(7.0, 0.0) == plain.estimator.estimate(7.0, 0.0)
    demand = Demand(60.0, (0.5, 0.5, 0, 0, 0, 0))
    assert busy.reprice(demand, 21.0) == plain.reprice(demand, 21.0)
    snap = busy.snapshot()
    assert snap.batch_running == sum(len(g.batch) for g in busy.gpus) and snap.batch_waiting > 0
    assert snap.inflight == plain.snapshot().inflight


def test_with_background_work_interactive_joins_pack_while_each_keeps_half_its_slo():
    """With the lane busy, a request joins the GPU already running an interactive member
    where every member there keeps half the SLO to spare, leaving the other GPU whole to the
    lane; one that would not keep it goes where it loads least. Without a lane, it spreads."""
    profile = step_profile(PROFILE)
    alone, two = N * profile.iteration_s(1), N * profile.iteration_s(2)
    runs = {}
    for lane in (False, True):
        sched, gpus = scheduler(2), []
        if lane:
            for i in range(40):
                sched.intake(0.0, Ask(1000 + i, 3600.0, 0, False, batch=True))
        now, _, works = advance(sched, 0.0, 1.0, {})
        gpus.append(sched.intake(now, Ask(1, now + 600.0, 0, False)).gpu)
        now, _, works = advance(sched, now, now + 1.0, {}, works)
        first_on = [i for i, g in enumerate(sched.gpus) if 1 in g.by_id]  # joined, running
        gpus.append(sched.intake(now, Ask(2, now + 600.0, 0, False)).gpu)
        now, _, works = advance(sched, now, now + 1.0, {}, works)
        # its SLO's half lies between its time alone and its time beside two members
        slo = alone + two
        gpus.append(sched.intake(now, Ask(3, now + slo, 0, False)).gpu)
        runs[lane] = gpus, [len(g.batch) for g in sched.gpus], first_on
    (spread, _, _), (packed, lanes, first_on) = runs[False], runs[True]
    assert first_on == [packed[0]]  # the first runs where it was placed when the second comes
    assert spread[1] != spread[0]  # no lane: the least-loaded GPU
    assert packed[1] == packed[0]  # a lane: beside the first, with time to spare
    assert lanes[1 - packed[0]] > 0  # the other GPU still runs the lane
    assert packed[2] != packed[0]  # packed, it would keep less than half its SLO


def test_a_background_job_past_its_deadline_ends_dropped_and_one_that_never_could_is_refused():
    sched = scheduler()
    refused = sched.intake(0.0, Ask(1, 1.0, 0, False, batch=True))
    assert refused.ended is not None and refused.ended.status == Status.REFUSED
    sched.intake(0.0, Ask(2, 21.0, 0, False))  # interactive: holds the GPU first
    sched.intake(0.0, Ask(3, 6.0, 0, False, batch=True))  # 4.2 s alone: not after it
    _, outcomes, _ = advance(sched, 0.0, 1e9, {})
    ended = {o.job.id: o.status for o in outcomes}
    assert ended == {2: Status.SERVED, 3: Status.DROPPED}


def test_the_batch_flag_is_parsed_and_its_errors_name_the_flag():
    assert parse_batch("0.4:3600") == BatchMix(0.4, 3600.0)
    for bad, says in [
        ("0.4", "SHARE:DEADLINE_S"),
        ("1.0:60", "SHARE"),
        ("0.2:0", "DEADLINE_S"),
        ("x:1", "SHARE:DEADLINE_S"),
    ]:
        with pytest.raises(InputError, match=says) as err:
            parse_batch(bad)
        assert "--batch" in str(err.value)


def with_stream(inputs, mix: BatchMix, seed: int = 1):
    merged = with_batch(inputs.requests, mix, [f"catalogue item {i}" for i in range(50)], seed)
    emb = HashingEmbedder().embed([r.prompt for r in merged])
    return dataclasses.replace(inputs, requests=merged, embeddings=emb)


def test_a_background_stream_is_merged_in_arrival_order_under_its_own_tenant():
    reqs = poisson(60.0, 5.0, 1, seed=3).requests
    merged = with_stream(poisson(60.0, 5.0, 1, seed=3), BatchMix(0.5, 600.0)).requests
    batch = [r for r in merged if r.batch]
    assert len(batch) == len(reqs) and len(merged) == 2 * len(reqs)
    assert [r.id for r in merged] == list(range(len(merged)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(merged, merged[1:], strict=False))
    assert {r.tenant for r in batch} == {"batch"}
    assert all(r.deadline_s == pytest.approx(r.arrival_s + 600.0) for r in batch)
    assert reqs[0].arrival_s <= batch[0].arrival_s and batch[-1].arrival_s <= reqs[-1].arrival_s


def test_the_simulator_serves_a_background_stream_and_reports_it_apart():
    plain = poisson(30.0, 10.0, 2, seed=5)
    inputs = with_stream(plain, BatchMix(0.5, 3600.0), seed=5)
    policy = get_policy("promptserve-step")
    base, out = simulate(policy, plain), simulate(policy, inputs)
    summary = out.records.summary(out.planner_ms)
    assert summary["requests"] == len(plain.requests)  # the headline figures: interactive
    bg = summary["background"]
    assert bg["jobs"] == len(inputs.requests) - len(plain.requests) and bg["served"] == bg["jobs"]
    assert "background" not in base.records.summary(base.planner_ms)
    rec = out.records
    assert (rec.interval[rec.batch] == 1).all()  # every step full
    # the interactive requests, at this light load, fare as they do alone
    assert summary["effective_quality"] == pytest.approx(
        base.records.summary(base.planner_ms)["effective_quality"], abs=0.5
    )
