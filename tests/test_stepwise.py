"""Step-level serving's policy (``policy/step/``) and its simulator."""

import numpy as np
import pytest

from factories import boundary
from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import Setting, Status, get_policy
from promptserve.policy.contract import Ask, Report
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Demand, Job
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.steptime import StepProfile, finishes, step_profile
from promptserve.types import Request

PROFILE = reference_profile()
QM = quality_model(PROFILE.levels, PROFILE.quality, "steep")
WORDS = ["cat", "castle", "forest", "robot", "ship", "storm", "neon", "city", "dragon", "moon"]


def poisson(rate_qpm, minutes, gpus, seed=0, slo=21.0):
    rng = np.random.default_rng(seed)
    n = int(rate_qpm * minutes)
    times = np.cumsum(rng.exponential(60.0 / rate_qpm, n))
    base = [" ".join(rng.choice(WORDS, 4)) for _ in range(40)]
    prompts = [
        base[i % 40] + ("" if rng.random() < 0.3 else f" {rng.choice(WORDS)}") for i in range(n)
    ]
    reqs = [
        Request(i, float(t), p, "default", float(t) + slo)
        for i, (t, p) in enumerate(zip(times, prompts))
    ]
    emb = HashingEmbedder().embed(prompts)
    setting = Setting((PROFILE,) * gpus, QM.matrix(), slo)
    return SimInputs(reqs, emb, setting, QM, shipped_thresholds("clip"), seed)


def test_the_reference_profile_gives_84_ms_steps_on_an_affine_curve_and_no_fixed_cost():
    sp = step_profile(PROFILE)
    assert sp.max_inflight == PROFILE.max_batch and sp.total_steps == 50
    assert sp.step_s[0] == pytest.approx(0.084, rel=1e-3)
    assert sp.step_s[7] == pytest.approx(0.084 * (1 + 0.55 * 7), rel=1e-2)
    assert sp.join_s + sp.leave_s < 0.005  # rounding of the published throughputs, vs 4.2 s
    # and it reproduces the batch profile: b requests of N - K steps in a batch of b
    for k in PROFILE.levels:
        assert (50 - k) * sp.iteration_s(8) == pytest.approx(PROFILE.batch_latency(k, 8), rel=1e-2)


def test_finish_times_walk_the_segments_as_members_leave():
    sp = StepProfile(10, (0, 5), (1.0, 1.5, 2.0), join_s=0.25, leave_s=0.5)
    # two members, 1 and 3 steps left: one step at 2 members, the first's decode (the second
    # waits for it), then two steps at 1 and its own decode
    first = 10.0 + 1.5 + 0.5
    assert finishes(sp, 10.0, [1, 3]) == pytest.approx([first, first + 2.0 + 0.5])
    # two that finish at one step are decoded together: both answered after both decodes
    assert finishes(sp, 0.0, [1, 1]) == pytest.approx([1.5 + 1.0, 1.5 + 1.0])
    assert finishes(sp, 0.0, [2], joined=1) == pytest.approx([0.25 + 2.0 + 0.5])


def test_a_join_that_would_make_a_member_late_is_not_made():
    sp = StepProfile(10, (0, 5), (1.0, 2.0))
    sched = StepScheduler(
        sp, 1, QM.matrix()[:2, :2], StepConfig("zero", shed=True, admission=False)
    )
    gpu = sched.gpus[0]
    first = Job(0, 0.0, 10.5, 0, 0, 0)  # alone: 10 steps x 1 s, due at 10.5
    assert sched.levels.choose_k(gpu, first, 0.0) == (0, 1)
    sched.life.admit_member(gpu, first, 0, [])
    second = Job(1, 0.0, 100.0, 0, 0, 0)  # would make every step 2 s: the first would be late
    assert sched.levels.choose_k(gpu, second, 0.0) is None
    relaxed = Job(0, 0.0, 25.0, 0, 0, 0)
    gpu.by_id.clear(), gpu.members.clear()
    sched.life.admit_member(gpu, relaxed, 0, [])
    assert sched.levels.choose_k(gpu, second, 0.0) == (0, 1)  # 10 steps x 2 s = 20 s <= 25 s


def test_with_slack_the_price_is_zero_and_every_request_runs_in_full():
    inputs = poisson(6, 6, gpus=2)
    result = simulate(get_policy("promptserve-step"), inputs)
    served = result.records.status == Status.SERVED
    assert served.all()
    assert (result.records.level[served] == 0).all()  # K = 0 is full quality
    assert (result.records.quality[served] == 100.0).all()


def test_a_saturated_cluster_joins_at_the_fastest_level_whatever_the_price():
    sched = StepScheduler(
        step_profile(PROFILE), 1, QM.matrix(), StepConfig("price", shed=True, admission=True)
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)  # slack: price 0
    job = Job(0, 0.0, 21.0, 10, 25, 10)
    assert sched.price == 0.0 and sched.levels.preferred_k(job, 0.0) == 0  # in full, 100%
    gpu = sched.gpus[0]
    # a full run finishes within 90% of the 21 s SLO with up to 7 members (84 ms x 4.3 x 50)
    assert sched.pricing.busy_at == 7
    for i in range(7):
        sched.life.admit_member(gpu, Job(i + 1, 0.0, 60.0, 0, 0, 0), 0, [])
    assert not sched.bursts.saturated(0.0) and sched.levels.preferred_k(job, 0.0) == 0
    sched.life.admit_member(gpu, Job(8, 0.0, 60.0, 0, 0, 0), 0, [])
    assert sched.bursts.saturated(0.0) and sched.levels.preferred_k(job, 0.0) == 25
    gpu.by_id.clear(), gpu.members.clear()
    sched.queue.push(Job(9, 0.0, 60.0, 0, 0, 0))  # a request waits to join
    assert sched.bursts.saturated(0.0) and sched.levels.preferred_k(job, 0.0) == 25


def test_a_burst_moves_joins_to_the_fastest_level_from_its_first_requests_and_back():
    """The excess work (arrivals' fastest steps beyond the step capacity) crosses the waiting
    share of the SLO within a burst's first requests, before any queue forms, and drains at
    the capacity once the burst is over."""
    sched = StepScheduler(
        step_profile(PROFILE),
        1,
        QM.matrix(),
        StepConfig("price", shed=True, admission=True),
        get_policy("promptserve-step").estimator(PROFILE.levels, 21.0),
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)  # slack: price 0
    cap = sched.excess.capacity_per_s
    assert cap == pytest.approx(sched.pricing.steps_capacity(21.0, 25))
    limit = cap * 0.1 * 21.0  # the waiting share of the SLO's worth of capacity
    probe = Job(10_000, 0.0, 21.0, 10, 25, 10)
    sizes = []
    for i in range(40):  # 40 requests in one second: far beyond one GPU
        sched.intake(i / 40, Ask(i, i / 40 + 21.0, 10, True))
        sizes.append(sched.excess.now(i / 40))
        if sched.bursts.saturated(i / 40):
            break
    assert not sched.queue  # the signal came before any queue
    assert sizes[-1] > limit >= sizes[-2]
    assert sched.levels.preferred_k(probe, i / 40) == 25
    quiet = i / 40 + sizes[-1] / cap  # drained
    for gpu in sched.gpus:  # the burst's members have left
        before = gpu.count
        gpu.by_id.clear(), gpu.members.clear(), gpu.joining.clear()
        sched.cluster.recount(gpu, before)
    assert (
        not sched.bursts.saturated(quiet + 1e-6)
        and sched.levels.preferred_k(probe, quiet + 1e-6) == 0
    )


def test_under_load_the_price_rises_and_requests_move_above_their_k_opt():
    inputs = poisson(110, 6, gpus=2)
    result = simulate(get_policy("promptserve-step"), inputs)
    rec = result.records
    served = rec.status == Status.SERVED
    assert served.mean() > 0.5
    assert rec.level[served].mean() > rec.k_opt[served].mean()


@pytest.mark.parametrize(
    "name", ["promptserve-step", "continuous-ha+shed+admit", "continuous-ht+shed+admit"]
)
def test_shed_serves_nothing_late_when_the_model_is_exact(name):
    """In the simulator the step times are the profile's, so a join checked against every
    member's deadline can never make anyone late: late work is the queue layer's defect."""
    result = simulate(get_policy(name), poisson(120, 4, gpus=2))
    rec = result.records
    served = rec.status == Status.SERVED
    assert served.sum() > 100
    assert not (rec.finish_s[served] > rec.deadline_s[served] + 1e-6).any()


def test_the_continuous_baselines_run_at_their_fixed_rule():
    inputs = poisson(30, 4, gpus=2)
    ha = simulate(get_policy("continuous-ha"), inputs).records
    ht = simulate(get_policy("continuous-ht"), inputs).records
    assert (ha.level[ha.status == Status.SERVED] == 0).all()
    ht_served = ht.status == Status.SERVED
    assert set(np.unique(ht.level[ht_served])) <= {0, 25}
    assert (ht.level[ht_served] == 25).mean() > 0.5  # every request with a neighbour at K = 25


def test_the_price_splits_the_class_that_moves_so_work_meets_capacity():
    sp = step_profile(PROFILE)
    sched = StepScheduler(sp, 2, QM.matrix(), StepConfig("price", shed=True, admission=True))
    mix = (0.225, 0.426, 0.213, 0.046, 0.032, 0.058)
    assert sched.reprice(Demand(10.0, mix), 21.0) == 0.0
    price = sched.reprice(Demand(70.0, mix), 21.0)
    assert 0.0 < price < 50.0
    assert 0.0 <= sched.pricing.split <= 1.0
    jobs = [Job(i, 0.0, 21.0, 5, 25, 5) for i in range(2000)]
    ks = {sched.levels.preferred_k(j, 0.0) for j in jobs}
    assert len(ks) >= 1 and all(k in PROFILE.levels for k in ks)


def test_the_oracle_bounds_step_level_schedules():
    from promptserve.sim.compare import CompareConfig, compare, sim_inputs

    inputs = poisson(90, 4, gpus=2, seed=3)
    names = ["promptserve-step", "continuous-ht+shed+admit", "continuous-ha+shed+admit"]
    config = CompareConfig(2, 21.0, "steep", 3)
    args = (inputs.requests, inputs.embeddings, PROFILE, shipped_thresholds("clip"), config)
    rows, oracle, _, _ = compare([get_policy(n) for n in names], sim_inputs(*args), config)
    bound = oracle["effective_quality_upper_bound"]
    assert 50.0 < max(rows[n]["effective_quality"] for n in names) <= bound + 1e-6


@pytest.mark.parametrize("rate_qpm", [60, 110, 200])
def test_step_level_schedules_stay_under_the_oracle_bound(rate_qpm):
    """The oracle prices each request at the cheapest batch cost that fits its window; a
    member sharing steps with n others pays s(n)/n per step, no less on an affine step curve
    (README, the oracle). Checked where a schedule could slip past it: light, busy, overload."""
    from promptserve.sim.oracle import oracle_bounds

    inputs = poisson(rate_qpm, 4, gpus=2, seed=rate_qpm)
    for name in ("promptserve-step", "continuous-ha+shed+admit", "continuous-ht+shed+admit"):
        rec = simulate(get_policy(name), inputs).records
        summary = rec.summary([])
        bound = oracle_bounds(
            rec.arrival_s, rec.deadline_s, rec.k_opt, inputs.setting.profiles, QM.matrix(), 1.0
        )
        assert summary["effective_quality"] <= bound["effective_quality_upper_bound"] + 1e-6
        assert summary["slo_violation_ratio"] >= bound["slo_violation_ratio_lower_bound"] - 1e-6


@pytest.mark.parametrize("name", ["promptserve", "promptserve-step"])
def test_the_simulators_re_plan_grid_can_be_moved_against_the_arrivals(name):
    """What ``bench_live_vs_sim`` spreads its prediction over: the same requests with the
    re-plan grid at another phase; every re-plan (plan or price) lands on the moved grid."""
    import dataclasses

    inputs = poisson(120, 2, gpus=2, seed=4)
    start, period = inputs.requests[0].arrival_s, get_policy(name).replan_s
    for phase in (0.0, 1.25):
        moved = dataclasses.replace(inputs, replan_phase_s=phase)
        result = simulate(get_policy(name), moved)
        times = [t for t, _ in (result.prices or result.plans)[1:]]
        assert len(times) >= 3
        offsets = [((t - start - phase) % period) for t in times]
        assert all(min(o, period - o) < 1e-6 for o in offsets), (phase, offsets[:5])


def test_a_live_run_is_judged_against_the_simulators_spread_over_phases():
    from promptserve.sim.live import replan_phase_spread, within_spread

    rows = [
        {"effective_quality": q, "slo_violation_ratio": v}
        for q, v in ((95.4, 0.004), (91.5, 0.049), (94.1, 0.016))
    ]
    spread = replan_phase_spread(rows)
    assert spread["phases"] == 3
    assert spread["effective_quality"] == {"min": 91.5, "mean": 93.6667, "max": 95.4}
    assert spread["slo_violation_ratio"]["max"] == 0.049
    assert within_spread({"effective_quality": 92.0, "slo_violation_ratio": 0.03}, spread)
    assert not within_spread({"effective_quality": 90.0, "slo_violation_ratio": 0.03}, spread)
    assert not within_spread({"effective_quality": 92.0, "slo_violation_ratio": 0.06}, spread)


def test_a_lost_gpu_hands_back_its_jobs_leaves_the_capacity_and_takes_no_one():
    sched = get_policy("promptserve-step").step_scheduler(
        Setting((PROFILE,) * 2, QM.matrix(), 21.0)
    )
    both = sched.pricing.steps_capacity(21.0)
    jobs = [Job(i, 0.0, 21.0, 0, 25, 0) for i in range(3)]
    for job in jobs:
        sched.placement.arrive(0.0, job)
    for gpu in sched.gpus:
        boundary(sched, gpu, 0.0, 0)
    held = {j.id for j in sched.gpus[1].joining} | set(sched.gpus[1].by_id)
    assert held  # the least-loaded placement put work on GPU 1
    back = sched.set_up(1, False)
    assert {j.id for j in back} == held and sched.gpus[1].count == 0
    assert sched.pricing.steps_capacity(21.0) == pytest.approx(both / 2)
    for i in range(3, 8):  # every new arrival goes to GPU 0 or waits, never to the lost one
        gpu, _ = sched.placement.arrive(0.0, Job(i, 0.0, 21.0, 0, 25, 0))
        assert gpu is None or gpu.index == 0
    boundary(sched, sched.gpus[1], 1.0, 0)  # a boundary on it pulls no one from the queue
    assert not sched.gpus[1].by_id and sched.set_up(1, False) == []
    sched.set_up(1, True)
    assert sched.pricing.steps_capacity(21.0) == pytest.approx(both)
    assert sched.cluster.least_loaded().index == 1  # empty again, it is where the next one goes


def overloaded(seconds=40.0, factor=10.0, seed=0, slo=20.0):
    """Poisson arrivals at ``factor`` times the capacity of 2 GPUs at the fastest level."""
    cap_per_s = 2 * PROFILE.throughput_qpm(PROFILE.levels[-1], PROFILE.max_batch) / 60.0
    return poisson(cap_per_s * factor * 60.0, seconds / 60.0, gpus=2, seed=seed, slo=slo)


@pytest.mark.parametrize("name", ["promptserve-step", "continuous-ht+shed+admit"])
def test_under_a_burst_far_beyond_capacity_admission_refuses_what_the_queue_would_drop(name):
    """At 10x capacity, what admission accepts is served in time: the rest is refused at
    arrival (HTTP 429 at once), not accepted, queued and dropped at its deadline (503).
    Without the queue in admission, 566 of 675 were accepted and dropped here, 79 served; with
    the queue counted from the earliest free slot on, 21 of 82."""
    records = simulate(get_policy(name), overloaded()).records
    refused = int((records.status == Status.REFUSED).sum())
    dropped = int((records.status == Status.DROPPED).sum())
    served = records.status == Status.SERVED
    in_time = int((served & (records.finish_s <= records.deadline_s + 1e-9)).sum())
    assert refused > 0.8 * len(records.status)
    assert in_time > 0 and dropped == 0


def test_a_fresh_arrival_queues_behind_waiting_jobs_instead_of_taking_their_slot():
    sp = StepProfile(10, (0, 5), (1.0, 1.0, 1.0))
    sched = StepScheduler(sp, 1, QM.matrix()[:2, :2], StepConfig("max", shed=True, admission=False))
    waiting = Job(0, 0.0, 100.0, 0, 0, 0)
    sched.queue.push(waiting)
    assert sched.queue.steps == 10 and sched.queue.full == 1
    gpu, outcome = sched.placement.arrive(
        0.0, Job(1, 0.0, 100.0, 5, 5, 5)
    )  # would fit the idle GPU
    assert gpu is None and outcome is None and len(sched.queue) == 2
    assert sched.queue.steps == 15 and sched.queue.full == 1
    assert sched.remove(0) is waiting and sched.queue.steps == 5 and sched.queue.full == 0


def test_a_join_is_checked_against_the_jobs_joining_before_it_at_the_same_boundary():
    sp = StepProfile(10, (0, 5), (1.0, 2.0))
    sched = StepScheduler(
        sp, 1, QM.matrix()[:2, :2], StepConfig("zero", shed=True, admission=False)
    )
    gpu = sched.gpus[0]
    first, second = Job(0, 0.0, 10.5, 0, 0, 0), Job(1, 0.0, 10.5, 0, 0, 0)
    assert sched.levels.choose_k(gpu, second, 0.0) == (0, 1)  # alone: 10 steps x 1 s
    assert sched.levels.choose_k(gpu, second, 0.0, ahead=[first]) is None  # together: 2 s steps


def running(sched, gpu, left):
    """Put members with ``left`` steps to go on ``gpu``, as a boundary would."""
    sched.admission.tally(gpu, -1)
    for i, r in enumerate(left):
        job = Job(1000 + 100 * gpu.index + i, 0.0, 1e9, 25, 25, 25)
        sched.life.admit_member(gpu, job, sched.profile.total_steps - r, [])
    sched.admission.tally(gpu, 1)


def test_admission_gives_a_queued_request_the_slot_that_frees_after_the_queue_took_its_own():
    """Behind a queue on full GPUs, a request joins at the leave that frees the slot after the
    ones the queue takes: with 3 waiting and none free, the 4th member to leave."""
    sched = StepScheduler(
        step_profile(PROFILE), 2, QM.matrix(), StepConfig("max", shed=True, admission=True)
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)
    sp, n = sched.profile, sched.pricing.inflight_for[25]
    for gpu in sched.gpus:  # both GPUs full at the capacity count, members spread out
        running(sched, gpu, [2 + 3 * i + gpu.index for i in range(n)])
        sched.cluster.recount(gpu, 0)
    assert sum(sched.admission.steps_left) == 2 * n
    for i in range(3):
        sched.queue.push(Job(100 + i, 0.0, 21.0, 25, 25, 25))
    leaves = sorted(2 + 3 * i + g for i in range(n) for g in (0, 1))
    start = leaves[3] * sp.iteration_s(n) + sp.leave_s
    assert sched.admission.slot_frees(0.0, n, n) == pytest.approx(start)
    gpu = sched.gpus[0]
    run = sp.join_s + 25 * sp.iteration_s(n) + sp.leave_s
    assert sched.admission.after_queue(gpu, Job(1, 0.0, start + run + 0.01, 25, 25, 25), 0.0)
    assert not sched.admission.after_queue(gpu, Job(2, 0.0, start + run - 0.01, 25, 25, 25), 0.0)


def test_behind_more_jobs_than_run_admission_counts_all_the_work_ahead_at_the_capacity():
    sched = StepScheduler(
        step_profile(PROFILE), 1, QM.matrix(), StepConfig("max", shed=True, admission=True)
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)
    sp, n = sched.profile, sched.pricing.inflight_for[25]
    gpu = sched.gpus[0]
    running(sched, gpu, [10, 20])
    sched.cluster.recount(gpu, 0)
    for i in range(n + 2):  # more than the free slots and the running members together
        sched.queue.push(Job(100 + i, 0.0, 21.0, 25, 25, 25))
    work = 30 + 25 * (n + 2)
    assert sched.admission.slot_frees(0.0, n, n) == pytest.approx(work / sp.steps_per_s(n))


def test_the_steps_left_tally_follows_joins_leaves_cancels_restarts_and_lost_gpus():
    sched = get_policy("promptserve-step").step_scheduler(
        Setting((PROFILE,) * 2, QM.matrix(), 21.0)
    )

    def recount():  # as of each GPU's last join or leave
        out = [0] * (sched.profile.total_steps + 1)
        for g in sched.gpus:
            for end, _, _ in g.members:
                out[end - g.tallied] += 1
        return out

    for i in range(12):
        sched.placement.arrive(0.0, Job(i, 0.0, 60.0, 25, 25, 25 if i % 3 else 0))
    for step, gpu in enumerate(sched.gpus * 6):
        boundary(sched, gpu, float(step), 5)
        assert sched.admission.steps_left == recount()
    quiet = sched.gpus[0]
    assert quiet.members[0][0] - quiet.done > 1  # no one leaves at the next step
    at, tallied = list(sched.admission.steps_left), quiet.tallied
    boundary(sched, quiet, 40.0, 1)  # no join, no leave: counted as before, on both clocks
    assert sched.admission.steps_left == at == recount() and quiet.tallied == tallied < quiet.done
    # it started at another K than it was given (its start latent was gone: from 0)
    member, running = next(iter(sched.gpus[0].by_id.items()))
    started = 0 if running.k else 25
    sched.update(41.0, 0, Report(started=((member, started),)))
    assert sched.gpus[0].by_id[member].k == started and sched.admission.steps_left == recount()
    sched.remove(next(iter(sched.gpus[1].by_id)))
    assert sched.admission.steps_left == recount()
    sched.set_up(0, False)
    assert sched.admission.steps_left == recount() and sum(sched.admission.steps_left) == len(
        sched.gpus[1].by_id
    )
