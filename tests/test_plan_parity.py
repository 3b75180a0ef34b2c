"""The simulator and the live runtime decide the same way around a plan: the first plan's
demand, when to re-plan, what a level change costs, and which answers enter the cache
(``policy/planning.py``). Each test drives the live runtime and checks it against that rule."""

import asyncio
import dataclasses

import pytest

from factories import client, modeled_app, tiny_app
from promptserve.policy.planning import first_demand, worth_caching
from promptserve.policy.types import Demand
from promptserve.server.live import LiveServer
from promptserve.sim.simulator import initial_demand
from promptserve.types import Request


def test_the_first_plan_is_made_for_the_expected_rate_on_both_clocks(tmp_path):
    runtime = modeled_app(tmp_path, expected_qpm=30.0).state.runtime
    trace = [Request(i, 2.0 * i, "p", "default", 2.0 * i + 60.0) for i in range(30)]
    assert runtime.planned_for == initial_demand(trace, runtime.levels)
    assert runtime.planned_for == first_demand(30.0, runtime.levels)


def test_a_plan_once_policy_is_not_re_planned_live_for_load(tmp_path):
    runtime = modeled_app(tmp_path, policy="clipper-ht+shed+admit").state.runtime
    solved = len(runtime.counters.planner_ms)
    for t in range(40):  # a load far from the first plan's
        runtime.estimator.observe(runtime.started + t, 10)
    asyncio.run(
        runtime.replans.replan(
            runtime.estimator.estimate(runtime.started + 40, runtime.started), False
        )
    )
    assert len(runtime.counters.planner_ms) == solved
    periodic = modeled_app(tmp_path / "p", policy="promptserve").state.runtime
    for t in range(40):
        periodic.estimator.observe(periodic.started + t, 10)
    asyncio.run(
        periodic.replans.replan(
            periodic.estimator.estimate(periodic.started + 40, periodic.started), False
        )
    )
    assert len(periodic.counters.planner_ms) == solved + 1  # the rule has two sides


def test_wants_plan_reads_the_policy_and_the_demand():
    from promptserve.policy import get_policy

    once, every = get_policy("clipper-ha"), get_policy("promptserve")
    old, new = Demand(10.0, (1.0, 0.0)), Demand(40.0, (0.5, 0.5))
    assert once.wants_plan(None, new, force=False)  # the first plan
    assert not once.wants_plan(old, new, force=False)
    assert once.wants_plan(old, new, force=True)  # a worker lost or back
    assert every.wants_plan(old, new, force=False)
    assert not every.wants_plan(old, old, force=False)


def test_a_level_change_costs_the_model_load_live_as_in_the_simulator(tmp_path):
    runtime = modeled_app(tmp_path, policy="proteus", workers=2).state.runtime
    load_s = runtime.setting.profiles[0].model_load_s
    assert load_s > 0
    before, sched = runtime.clock(), runtime.sched
    current = runtime.load().levels
    moved = [runtime.levels[-1] if level != runtime.levels[-1] else 0 for level in current]
    proposal = sched.propose(runtime.planned_for, force=True)
    plan = dataclasses.replace(sched.solve(proposal), gpu_levels=tuple(moved))
    assert sched.adopt(before, proposal, plan).plan == plan
    assert runtime.load().levels == tuple(moved)
    # no GPU takes work before its new level is loaded: the scheduler looks again only then
    assert sched.schedule(before).wake_s >= before + load_s


@pytest.mark.parametrize("similarity, kept", [(None, True), (0.93, True), (0.99995, False)])
def test_worth_caching(similarity, kept):
    assert worth_caching(similarity) is kept


def test_an_exact_repeat_adds_no_entry_live(tmp_path):
    app = tiny_app(tmp_path)
    with LiveServer(app) as url:
        c = client(url, timeout=120)
        for _ in range(2):
            c.images.generate(prompt="a lighthouse at dusk, oil painting", size="64x64")
        c.images.generate(prompt="a red kite over the dunes", size="64x64")
    assert len(app.state.runtime.cache.index) == 2  # the repeat found its twin and added nothing


@pytest.mark.parametrize("name", ["promptserve", "argus", "proteus"])
def test_an_idle_server_is_planned_at_full_quality_whatever_the_last_burst_left(name):
    """Issue 15: with no load every level ties, and a solver kept K = 10 from the last burst;
    the next unrelated prompt was then served from a stranger's latent at 89%."""
    import numpy as np

    from promptserve.policy import Setting, get_policy
    from promptserve.profile import reference_profile
    from promptserve.quality import quality_model

    profile = reference_profile()
    qm = quality_model(profile.levels, profile.quality, "steep")
    setting = Setting((profile, profile), qm.matrix(), 21.0)
    idle = Demand(0.0, tuple(float(i == 0) for i in range(len(profile.levels))))
    plan = get_policy(name).plan(idle, setting, [10, 10])
    assert plan.gpu_levels == (0, 0)
    assert np.allclose([row[0] for row in plan.route], 1.0)  # every class routed to K = 0


def test_going_idle_is_a_demand_change_however_small_the_last_rate():
    from promptserve.policy import get_policy

    trickle, idle = Demand(0.5, (0.0, 1.0)), Demand(0.0, (1.0, 0.0))
    assert get_policy("promptserve").wants_plan(trickle, idle, force=False)
    assert get_policy("promptserve").wants_plan(idle, trickle, force=False)


def test_the_re_plan_grid_runs_from_the_first_arrival():
    from promptserve.policy.planning import until_replan

    assert until_replan(3.0, None, 5.0) == 5.0  # nothing arrived: a period
    assert until_replan(12.25, 10.0, 5.0) == pytest.approx(2.75)
    assert until_replan(15.0, 10.0, 5.0) == pytest.approx(5.0)  # on a tick: the next one
    assert until_replan(31.0, 10.0, 5.0) == pytest.approx(4.0)  # a late wake-up keeps the grid


@pytest.mark.parametrize("policy", ["promptserve", "promptserve-step"])
def test_the_server_starts_its_estimate_and_grid_at_the_first_request(tmp_path, policy):
    """As the simulator starts at its first arrival: idle time after start-up neither dilutes
    the first rate estimate nor sets the re-plan grid's phase, and the forecast's plan stands
    until a request is seen."""
    runtime = modeled_app(tmp_path, policy=policy, expected_qpm=30.0).state.runtime
    forecast = runtime.planned_for

    async def scenario() -> tuple[bool, float, float, bool]:
        idle = await runtime.replans.wait(0.05)  # no request yet: nothing to re-plan for
        runtime.note_arrival(runtime.clock())
        first = runtime.first_arrival
        runtime.note_arrival(runtime.clock() + 3.0)  # a later request moves nothing
        due = await runtime.replans.wait(0.05)
        return idle, first, runtime.started, due

    idle, first, started, due = asyncio.run(scenario())
    assert idle is False and due is True
    assert started == first == runtime.first_arrival
    assert runtime.planned_for == forecast
