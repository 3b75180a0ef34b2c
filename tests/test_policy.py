import ast
from itertools import combinations_with_replacement
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptserve.errors import InputError
from promptserve.policy import (
    Demand,
    DispatchConfig,
    Dispatcher,
    Job,
    LoadEstimator,
    Setting,
    Status,
    admit,
    align,
    allocate,
    get_policy,
    parse_policies,
    plan_joint,
    route,
)
from promptserve.policy.capacity import level_capacity_qpm
from promptserve.profile import reference_profile
from promptserve.quality import quality_model

PROFILE = reference_profile()
Q = quality_model(PROFILE.levels, PROFILE.quality, "mild").matrix()
MIX = (0.05, 0.21, 0.24, 0.12, 0.14, 0.24)


def brute_force(gpus, throughput, quality, load):
    best = -1.0
    target = min(load, gpus * max(throughput))
    for combo in combinations_with_replacement(range(len(throughput)), gpus):
        counts = np.bincount(combo, minlength=len(throughput))
        if (counts * throughput).sum() + 1e-9 < target:
            continue
        left, value = target, 0.0
        for i in np.argsort(quality)[::-1]:
            take = min(left, counts[i] * throughput[i])
            value += take * quality[i]
            left -= take
        best = max(best, value)
    return best


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(st.floats(1, 50), min_size=2, max_size=4),
    st.data(),
)
def test_allocation_is_optimal_against_enumeration(gpus, throughput, data):
    m = len(throughput)
    quality = data.draw(st.lists(st.floats(50, 100), min_size=m, max_size=m))
    # loads below 0.01 qpm sit inside the solver's feasibility tolerance (1e-7)
    load = data.draw(st.just(0.0) | st.floats(0.01, gpus * max(throughput) * 1.2))
    alloc = allocate(gpus, throughput, quality, load)
    assert sum(alloc.counts) == gpus
    assert all(y <= c * t + 1e-6 for y, c, t in zip(alloc.load_qpm, alloc.counts, throughput))
    assert sum(alloc.load_qpm) == pytest.approx(min(load, gpus * max(throughput)), abs=1e-6)
    assert alloc.objective == pytest.approx(
        brute_force(gpus, np.array(throughput), np.array(quality), load), rel=1e-6, abs=1e-5
    )


def test_aligner_hand_worked_example():
    # three levels (K low to high). capacity 2 / 1 / 3, demand 1 / 3 / 1.
    # K=high: own 1 served, 2 spare -> takes 2 of the 3 from the middle class.
    # K=mid: its last 1 served at mid, no spare.  K=low: own 1 served, 1 spare.
    p = align([2, 1, 3], [1, 3, 1])
    expected = np.array([[1, 0, 0], [0, 1 / 3, 2 / 3], [0, 0, 1]])
    assert np.allclose(p, expected)


def test_aligner_pushes_excess_down_without_quality_loss():
    # everyone tolerates the top level, but it only takes 1 of 3: the rest go down.
    p = align([2, 0, 1], [0, 0, 3])
    assert np.allclose(p[2], [2 / 3, 0, 1 / 3])


def test_joint_plan_gives_full_quality_when_load_is_light():
    plan = plan_joint(Demand(30, MIX), (PROFILE,) * 8, Q, 21.0, 32)
    assert plan.expected_quality == pytest.approx(100.0)
    assert all(r == 0 for r in plan.refuse)


def test_joint_plan_refuses_only_under_overload_and_trades_quality_for_capacity():
    light = plan_joint(Demand(150, MIX), (PROFILE,) * 8, Q, 21.0, 32)
    heavy = plan_joint(Demand(1000, MIX), (PROFILE,) * 8, Q, 21.0, 32)
    assert sum(light.refuse) == 0 and sum(heavy.refuse) > 0
    assert heavy.gpus_at(25) > light.gpus_at(25)
    for row in heavy.route + light.route:
        assert sum(row) == pytest.approx(1.0)


def test_joint_plan_takes_heterogeneous_gpus():
    fast = reference_profile()
    slow = type(fast)(
        **{
            **fast.__dict__,
            "name": "slow",
            "latency_s": tuple(tuple(2 * v for v in row) for row in fast.latency_s),
        }
    )
    plan = plan_joint(Demand(200, MIX), (fast,) * 4 + (slow,) * 4, Q, 21.0, 32)
    assert len(plan.gpu_levels) == 8 and all(k is not None for k in plan.gpu_levels)
    one_kind = plan_joint(Demand(200, MIX), (fast,) * 8, Q, 21.0, 32)
    assert one_kind.expected_quality > plan.expected_quality  # slow GPUs cost quality
    assert all(k in (0, 5, 10, 15, 20, 25) for k in plan.gpu_levels)


def test_joint_plan_capacity_pools_gpus_that_share_a_level():
    # one GPU alone on a level keeps less of its throughput in time than two sharing a queue
    two = level_capacity_qpm(PROFILE, 0, 21.0, 32, 2)
    assert two > 2 * level_capacity_qpm(PROFILE, 0, 21.0, 32, 1)
    # 2 GPUs at 38 queries/minute: both at K=0 keep all in time at full quality; the first model
    # (85% of throughput for any count) split them over two levels
    plan = plan_joint(Demand(38, MIX), (PROFILE,) * 2, Q, 21.0, 32)
    assert plan.gpu_levels == (0, 0) and plan.expected_quality == pytest.approx(100.0)
    assert plan.capacity_qpm[0] == pytest.approx(two)
    # the MILP's capacity is exactly the model's, the lone-GPU discount included
    lone = plan_joint(Demand(12, MIX), (PROFILE,) * 2, Q, 21.0, 32)
    assert sorted(lone.gpu_levels) == [0, 25]  # the spare GPU waits at the fastest level
    assert lone.capacity_qpm[0] == pytest.approx(level_capacity_qpm(PROFILE, 0, 21.0, 32, 1))


def test_joint_plan_keeps_gpus_on_their_level():
    first = plan_joint(Demand(200, MIX), (PROFILE,) * 8, Q, 21.0, 32)
    assert len(set(first.gpu_levels)) > 1
    # the same counts from a permuted assignment: no GPU changes level (nothing reloads)
    current = first.gpu_levels[::-1]
    assert current != first.gpu_levels
    again = plan_joint(Demand(200, MIX), (PROFILE,) * 8, Q, 21.0, 32, current=current)
    assert again.gpu_levels == current


def test_router_follows_the_row():
    plan = get_policy("argus").plan(Demand(300, MIX), Setting((PROFILE,) * 8, Q, 21.0))
    row = plan.route[PROFILE.levels.index(10)]
    draws = [route(plan, 10, u) for u in np.linspace(0, 1, 2000, endpoint=False)]
    for k, p in zip(PROFILE.levels, row):
        assert draws.count(k) / 2000 == pytest.approx(p, abs=0.002)


def job(i, deadline, level=0, k_max=25, arrival=0.0):
    return Job(i, arrival, deadline, k_opt=level, k_max=k_max, level=level)


def test_dispatcher_batches_edf_and_as_large_as_the_earliest_deadline_allows():
    d = Dispatcher.create([PROFILE], DispatchConfig(max_batch=8))
    d.set_levels(0.0, [25])
    for i, dl in enumerate([30, 9, 100, 100, 100, 100, 100, 100, 100]):
        d.enqueue(job(i, dl, level=25))
    (batch,), dropped = d.step(0.0)
    assert not dropped
    assert batch.jobs[0].id == 1  # earliest deadline first
    # latency(25, b) = 2.1 * (1 + 0.55 (b - 1)) <= 9  ->  b = 6
    assert len(batch.jobs) == 6 and batch.until_s <= 9.0
    assert PROFILE.batch_latency(25, 7) > 9.0


def test_dispatcher_escalates_or_drops_what_cannot_make_it():
    d = Dispatcher.create([PROFILE, PROFILE], DispatchConfig(max_batch=8, late="escalate"))
    d.set_levels(0.0, [0, 25])
    d.enqueue(job(0, 3.0, level=0))  # K=0 needs 4.2 s; K=25 needs 2.1 s
    d.enqueue(job(1, 1.0, level=0))  # nothing makes 1 s
    dispatches, outcomes = d.step(0.0)
    assert [(o.job.id, o.status) for o in outcomes] == [(1, Status.DROPPED)]
    assert [(x.level, [j.id for j in x.jobs]) for x in dispatches] == [(25, [0])]


def test_dispatcher_serves_late_when_told_to():
    d = Dispatcher.create([PROFILE], DispatchConfig(max_batch=8, late="serve"))
    d.set_levels(0.0, [0])
    d.enqueue(job(0, 1.0))
    (batch,), outcomes = d.step(0.0)
    assert not outcomes
    served = d.on_batch_done(batch.until_s, batch)
    assert served[0].status == Status.SERVED and served[0].time_s > 1.0


def test_failed_gpu_requeues_its_jobs():
    d = Dispatcher.create([PROFILE], DispatchConfig())
    d.set_levels(0.0, [0])
    d.enqueue(job(0, 100.0))
    d.step(0.0)
    assert d.pending() == 0
    assert [j.id for j in d.fail_gpu(1.0, 0)] == [0]
    assert d.pending() == 1
    assert d.step(1.0) == ([], []) and d.serving_levels() == set()  # down: takes nothing
    d.set_up(0, True)
    dispatches, _ = d.step(2.0)
    assert [j.id for j in dispatches[0].jobs] == [0]


def test_admission_refuses_only_what_no_level_can_meet():
    d = Dispatcher.create([PROFILE, PROFILE], DispatchConfig())
    d.set_levels(0.0, [0, 25])
    assert admit(d, job(0, 10.0), 0.0).level == 0
    moved = admit(d, job(1, 3.0), 0.0)
    assert moved is not None and moved.level == 25
    assert admit(d, job(2, 3.0, k_max=0), 0.0) is None  # no neighbour: cannot skip steps
    assert admit(d, job(3, 1.0), 0.0) is None


def test_admission_predicts_the_level_a_job_really_runs_at():
    # a cache miss (k_max = 0) routed to K = 25 runs at K = 0: 4.2 s, not 2.1 s
    d = Dispatcher.create([PROFILE, PROFILE], DispatchConfig())
    d.set_levels(0.0, [0, 25])
    assert admit(d, job(0, 3.0, level=25, k_max=0), 0.0) is None
    assert admit(d, job(1, 5.0, level=25, k_max=0), 0.0) is not None
    assert d.predicted_finish(25, 0.0, k_max=0) == pytest.approx(PROFILE.batch_latency(0, 1))


def test_estimator_sees_a_burst_within_the_short_window():
    est = LoadEstimator(PROFILE.levels, short_s=10, long_s=60)
    for t in np.arange(0, 60, 1.0):  # 60 qpm
        est.observe(float(t), 0)
    assert est.estimate(60.0).rate_qpm == pytest.approx(60, rel=0.05)
    for t in np.arange(60, 65, 0.1):  # 600 qpm for 5 s
        est.observe(float(t), 25)
    burst = est.estimate(65.0)
    assert burst.rate_qpm > 300 and burst.mix[-1] > 0.4


def test_bad_policy_names():
    with pytest.raises(InputError, match="policy 'fastest' is not one of"):
        parse_policies("argus,fastest")
    with pytest.raises(InputError, match="empty"):
        parse_policies(" , ")
    with pytest.raises(InputError, match="modifier 'quick' is not one of: \\+shed, \\+admit"):
        get_policy("argus+quick")
    with pytest.raises(InputError, match="'shed' given twice"):
        get_policy("argus+shed+shed")
    with pytest.raises(InputError, match="names 'argus\\+shed' twice"):
        parse_policies("argus+shed,argus+shed")


def test_queue_layer_modifiers_give_any_policy_promptserve_s_queue_and_admission():
    plain, layered = get_policy("argus"), get_policy(" argus + admit + shed ")
    assert layered.name == "argus+shed+admit"  # canonical order
    assert (plain.dispatch.late, plain.admission) == ("expire", False)
    ours = get_policy("promptserve")
    assert layered.dispatch == ours.dispatch and layered.admission
    assert layered.replan_s == plain.replan_s == 60.0  # the planner's period is untouched
    assert get_policy("argus+fast").replan_s == ours.replan_s
    assert get_policy("nirvana+shed").dispatch.pinned is False  # pinning is the policy's own
    demand, setting = Demand(300, MIX), Setting((PROFILE,) * 8, Q, 21.0)
    assert layered.plan(demand, setting) == plain.plan(demand, setting)


def test_policy_package_is_pure():
    """policy/ imports no clock, event loop, device or server, directly or through the
    project's own modules it imports; the path comes from the package, not the working dir."""
    import promptserve.policy

    banned = {"asyncio", "time", "torch", "fastapi", "ray", "uvicorn", "threading"}
    package = Path(promptserve.policy.__file__).parent
    src = package.parents[1]
    files = sorted(package.glob("*.py"))
    assert len(files) >= 10
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
            if name.startswith("promptserve"):
                module = src / Path(*name.split("."))
                todo += [
                    p for p in (module.with_suffix(".py"), module / "__init__.py") if p.is_file()
                ]
    assert any(p.name == "profile.py" for p in seen)  # followed into promptserve.profile


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_intake_observes_routes_admits_and_queues_for_both_clocks():
    from promptserve.policy import intake

    d = Dispatcher.create([PROFILE, PROFILE], DispatchConfig())
    d.set_levels(0.0, [0, 25])
    plan = get_policy("clipper-ht").plan(Demand(10, MIX), Setting((PROFILE,) * 2, Q, 21.0))
    est = LoadEstimator(PROFILE.levels)
    job, queued = intake(0, 0.0, 30.0, 25, True, plan, d, est, admission=True, u=0.5)
    assert queued and (job.level, job.k_max) == (25, 25) and d.queue_len(25) == 1
    # no neighbour: it can only run at K = 0, which cannot make a 3 s deadline: refused
    job, queued = intake(1, 0.0, 3.0, 0, False, plan, d, est, admission=True, u=0.5)
    assert not queued and job.k_max == 0 and d.pending() == 1
    # without admission the same request is queued and left to the dispatcher
    _, queued = intake(2, 0.0, 3.0, 0, False, plan, d, est, admission=False, u=0.5)
    assert queued and d.pending() == 2
    assert est.estimate(1.0).rate_qpm > 0  # every arrival was observed, refused or not
