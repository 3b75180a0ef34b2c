"""The replay (``policy/replay.py``) is the simulator's own run on a virtual clock, and the
selector (``policy/selector.py``) switches to the rule that replays best, past its margin."""

from dataclasses import replace

import numpy as np
import pytest
from tests.test_stepwise import poisson

from promptserve.policy import get_policy
from promptserve.policy.contract import Ask
from promptserve.policy.replay import replay
from promptserve.policy.selector import Selector, SelectorConfig, candidates
from promptserve.policy.types import Demand, Job
from promptserve.sim.events import EventRun, initial_demand
from promptserve.sim.simulator import simulate

STEP = get_policy("promptserve-step")


def run_with_asks(policy, inputs):
    """A simulated run, and the asks its scheduler was given (K_opt and neighbour included)."""
    run = EventRun(policy, inputs, None)
    result = run.run()
    asks = [
        (r.arrival_s, Ask(i, r.deadline_s, int(result.records.k_opt[i]), i in run.match))
        for i, r in enumerate(inputs.requests)
    ]
    return run, result, asks


def test_a_replay_from_the_start_is_the_simulated_run():
    inputs = poisson(90, 3, gpus=2, seed=4)
    run, result, asks = run_with_asks(STEP, inputs)
    sched = STEP.scheduler(inputs.setting, inputs.seed)
    start = inputs.requests[0].arrival_s
    sched.replan(start, initial_demand(inputs.requests, sched.spec.levels))
    period = STEP.replan_s
    got = replay(sched, start, asks, run._value, (start + period, period, start))
    summary = result.records.summary([])
    assert got.ended == len(asks)
    assert got.value == np.float64(got.value)  # a number, and the run's own:
    assert abs(got.value - summary["effective_quality"]) < 1e-3
    assert got.in_time == summary["served_in_slo"]


def test_switching_the_rule_changes_the_joins_that_follow():
    inputs = poisson(30, 2, gpus=1, seed=1)
    zero = replace(STEP.step_scheduler(inputs.setting).config, rule="zero")
    plain = simulate(STEP, inputs).records
    sched = STEP.scheduler(inputs.setting, inputs.seed)
    sched.use(zero)
    assert sched.config.rule == "zero" and sched.levels.spec.config.rule == "zero"
    switched = EventRun(STEP, inputs, None, scheduler=sched).run().records
    assert (switched.level[switched.level >= 0] == 0).all()  # every join in full
    assert (plain.level > 0).any()  # where the price had some skip steps


def test_the_selector_switches_only_past_its_margin():
    inputs = poisson(150, 4, gpus=2, seed=2)  # past capacity: the fastest rule serves more
    base = STEP.step_scheduler(inputs.setting).config
    cands = candidates(base, feature_cache=False)
    assert [c.name for c in cands] == ["price", "fastest"]
    chose = {}
    for margin in (0.25, 1e9):
        _, result, asks = run_with_asks(STEP, inputs)
        sched = STEP.scheduler(inputs.setting, inputs.seed)
        start = inputs.requests[0].arrival_s
        sched.replan(start, initial_demand(inputs.requests, sched.spec.levels))
        sel = Selector(cands, EventRun(STEP, inputs, None)._value, SelectorConfig(margin=margin))
        assert sel.decide(start, sched, {}, None) is None  # no window yet: a first state kept
        for t, ask in asks[: len(asks) // 2]:
            sel.observe(t, ask)
        choice = sel.decide(asks[len(asks) // 2][0], sched, {}, None)
        assert choice is not None and set(choice.scores) == {"price", "fastest"}
        chose[margin] = choice
    best = max(chose[0.25].scores, key=chose[0.25].scores.get)
    # past capacity the price is at its cap and picks every fastest pair: the same joins
    assert chose[0.25].scores["price"] == chose[0.25].scores["fastest"]
    assert chose[1e9].chosen == "price" and not chose[1e9].switched  # never past the margin
    if chose[0.25].scores[best] > chose[0.25].scores["price"] + 0.25:
        assert chose[0.25].switched and chose[0.25].chosen == best
    else:
        assert chose[0.25].chosen == "price"


def test_select_in_the_simulator_records_its_choices_and_ends_every_request():
    inputs = poisson(120, 3, gpus=2, seed=3)
    result = simulate(get_policy("promptserve-step+select"), inputs)
    assert result.choices and all(c.chosen in {"price", "fastest"} for c in result.choices)
    times = [c.at_s for c in result.choices]
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(times, times[1:]))  # once a period
    assert (result.records.status >= 0).all()


def test_value_shedding_floors_at_the_class_worth_least_per_step():
    """Over capacity even at the fastest levels, ``+value`` refuses by quality per step: a
    miss (50 steps for 100 points) before any hit (25 steps for at least 89.6)."""
    policy = get_policy("promptserve-step+shed+admit+value")
    inputs = poisson(30, 1, gpus=1)
    sched = policy.step_scheduler(inputs.setting)
    levels = sched.spec.levels
    mix = (0.5,) + (0.5 / (len(levels) - 1),) * (len(levels) - 1)
    sched.replan(0.0, Demand(60.0, mix))  # the hits fit one GPU, the misses do not
    pricing = sched.pricing
    assert pricing.price >= 50.0
    assert pricing.density(0, 0) == pytest.approx(100.0 / 50)
    assert pricing.density(1, len(levels) - 1) > pricing.density(0, 0)
    assert pricing.floor == pytest.approx(pricing.density(0, 0)) and pricing.floor_split < 1
    misses = [Job(i, 0.0, 21.0, 0, 0, 0) for i in range(200)]
    admitted = sum(pricing.worth(j) for j in misses) / len(misses)
    assert admitted == pytest.approx(pricing.floor_split, abs=0.1)  # the marginal share
    assert all(pricing.worth(Job(i, 0.0, 21.0, 5, levels[-1], 5)) for i in range(200))
    sched.replan(0.0, Demand(400.0, mix))  # even the hits do not fit: floor among them
    assert pricing.floor > pricing.density(0, 0)
    assert not any(pricing.worth(j) for j in misses)
    sched.replan(0.0, Demand(10.0, mix))  # slack: no floor
    assert pricing.floor == 0.0 and all(pricing.worth(j) for j in misses)


def test_metrics_show_the_rule_serving_its_replays_and_what_the_selector_did():
    from promptserve.server.metrics import Metrics, exposition
    from promptserve.server.observer import selection
    from promptserve.server.selection import SelectionStats

    stats = SelectionStats(
        chosen="fastest", scores={"price": 91.5, "fastest": 93.25}, selections=7, switches=2,
        skipped={"budget": 3}, cpu_s=0.75, candidates=("price", "fastest"),
    )  # fmt: skip
    metrics = Metrics()
    selection(stats, metrics)
    text = exposition(metrics).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['promptserve_selector_chosen{candidate="fastest"}']) == 1.0
    assert float(lines['promptserve_selector_chosen{candidate="price"}']) == 0.0
    assert float(lines['promptserve_selector_replayed_quality{candidate="fastest"}']) == 93.25
    assert float(lines['promptserve_selector_selections{event="switch"}']) == 2.0
    assert float(lines['promptserve_selector_selections{event="skipped_budget"}']) == 3.0
    assert float(lines["promptserve_selector_cpu_seconds"]) == 0.75


def test_a_selection_past_its_cpu_budget_is_skipped_and_keeps_a_state():
    import asyncio

    from promptserve.server.selection import LiveSelection

    inputs = poisson(60, 2, gpus=2, seed=5)
    sched = STEP.scheduler(inputs.setting, inputs.seed)
    sched.replan(0.0, initial_demand(inputs.requests, sched.spec.levels))
    live = LiveSelection(sched, EventRun(STEP, inputs, None)._value, False, cpu_share=0.1)
    live.stats.cpu_s = 5.0  # already past 10% of the 20 s since start
    got = asyncio.run(live.tick(20.0, sched, dict, None, lambda: 20.0))
    assert got is None and live.stats.skipped["budget"] == 1 and live.stats.selections == 0
    assert not live.due(25.0) and live.due(30.0)  # the next one a period on
    assert len(live.selector._states) == 1  # a later window starts from here
