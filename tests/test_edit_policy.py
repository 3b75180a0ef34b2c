"""Edits in the policy (``Ask.start``): an edit runs from its own start step on every rule, is
priced, admitted and timed at its own steps, keeps a full run's quality but for its interval,
and never reads or writes the approximate cache; the simulator takes a share of them."""

import dataclasses

import numpy as np
import pytest

from promptserve.errors import InputError
from promptserve.policy import get_policy
from promptserve.policy.contract import Ask, Report
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Demand, Status
from promptserve.quality import interval_quality, served_quality
from promptserve.sim.simulator import simulate
from promptserve.steptime import step_profile
from promptserve.strength import start_step
from promptserve.workload.edits import EditMix, parse_edits, with_edits
from test_stepwise import PROFILE, QM, poisson


def run_alone(config: StepConfig, ask: Ask):
    """``ask`` alone on one idle GPU under ``config``: its member as it joined, its outcome."""
    sched = StepScheduler(
        step_profile(PROFILE), 1, QM.matrix(), config, LoadEstimator(PROFILE.levels)
    )
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)
    assert sched.intake(0.0, ask).ended is None
    joined, now = [], 0.0
    for _ in range(10):  # the GPU's works, each run to its end, until it serves the request
        (work,) = sched.schedule(now).work
        joined += work.joins
        now = work.until_s
        served = [o for o in sched.update(now, 0, Report(steps=work.steps))]
        if served:
            (member,) = joined
            return member, served
    raise AssertionError("never served")


@pytest.mark.parametrize("rule", ["price", "zero", "max"])
def test_an_edit_joins_at_its_own_start_whatever_the_rule_and_runs_only_its_steps(rule):
    config = StepConfig(rule, shed=True, admission=True)
    edit, (edit_out,) = run_alone(config, Ask(0, 60.0, 0, False, start=35))
    full, (full_out,) = run_alone(config, Ask(0, 60.0, 0, False))
    assert edit.k == 35 and edit_out.level == 35 and full.k == 0
    # alone on an idle GPU, its run is its 15 steps against a generation's 50
    assert edit_out.time_s == pytest.approx(full_out.time_s * 15 / 50, rel=0.02)


def test_an_edit_keeps_a_full_runs_quality_but_for_its_interval():
    iq = interval_quality("steep")
    interval_q = tuple(iq.q_r(r) for r in range(1, 5))
    assert served_quality(QM, interval_q, 50, 0, 35, 1, start=35) == 100.0
    # a generation at K = 35 from a neighbour is not what an edit is: it loses points for K
    assert served_quality(QM, interval_q, 50, 0, 25) < 100.0
    kept = served_quality(QM, interval_q, 50, 0, 10, 3, start=10)
    assert kept < 100.0 and kept == pytest.approx(
        served_quality(QM, interval_q, 50, 0, 0, 3) * 100.0 / QM.q(0, 0), rel=0.05
    )


def test_the_price_counts_an_edit_at_its_own_steps_not_a_full_runs():
    sched = StepScheduler(
        step_profile(PROFILE), 2, QM.matrix(), StepConfig("price", shed=True, admission=True)
    )
    mix = (1.0, 0, 0, 0, 0, 0)
    rate = 60.0  # full runs: more than 2 GPUs do in the SLO; runs of 15 steps: well within
    assert sched.reprice(Demand(rate, mix), 21.0) > 0.0
    assert sched.reprice(Demand(rate, mix, edits=1.0, edit_steps=15.0), 21.0) == 0.0
    assert sched.reprice(Demand(rate, mix, edits=1.0, edit_steps=50.0), 21.0) > 0.0


def test_the_estimate_counts_edits_in_the_rate_and_apart_from_the_mix():
    est, plain = LoadEstimator(PROFILE.levels), LoadEstimator(PROFILE.levels)
    for i in range(30):
        est.observe(float(i), 10)  # generations, all of class K_opt = 10
    for i in range(30):
        est.observe(30.0 + i, 0, edit_steps=20)
    for i in range(60):
        plain.observe(float(i), 10)
    demand = est.estimate(59.0)
    assert demand.rate_qpm == plain.estimate(59.0).rate_qpm > 0
    assert demand.mix[PROFILE.levels.index(10)] == 1.0  # the edits are in no K_opt class
    assert demand.edits == pytest.approx(0.5) and demand.edit_steps == 20.0


def test_a_simulated_edit_mix_serves_edits_from_their_start_and_never_from_the_cache():
    inputs = poisson(30, 6, gpus=2)
    mix = EditMix(0.3, 0.3, 0.8)
    requests = with_edits(inputs.requests, mix, seed=3)
    edits = np.array([r.strength is not None for r in requests])
    assert 0.2 < edits.mean() < 0.4
    result = simulate(
        get_policy("promptserve-step"), dataclasses.replace(inputs, requests=requests)
    )
    rec = result.records
    served = rec.status == Status.SERVED
    assert served[edits].all()
    starts = [start_step(50, r.strength) for r in requests if r.strength is not None]
    assert rec.level[edits].tolist() == starts  # each from its own start, none from a level
    assert (rec.quality[edits] == 100.0).all()  # slack: every edit in full
    assert not rec.hit()[edits].any() and rec.hit()[~edits].any()
    assert rec.edit is not None and (rec.edit == edits).all()
    # an edit's image is its own: the cache holds only the generations (as many as without
    # the edits' requests, each inserted once at most)
    plain = simulate(
        get_policy("promptserve-step"),
        dataclasses.replace(inputs, requests=[r for r in inputs.requests]),
    )
    assert (plain.records.hit()).sum() >= rec.hit().sum()


def test_a_pinned_policy_batches_an_edit_at_a_level_its_start_reaches():
    inputs = poisson(20, 4, gpus=2)
    requests = with_edits(inputs.requests, EditMix(0.5, 0.3, 0.5), seed=1)
    result = simulate(get_policy("argus"), dataclasses.replace(inputs, requests=requests))
    rec = result.records
    edits = np.array([r.strength is not None for r in requests])
    served = (rec.status == Status.SERVED) & edits
    assert served.any()
    starts = np.array([start_step(50, r.strength or 1.0) for r in requests])
    assert (rec.level[served] <= starts[served]).all()  # a batch of at least its own steps
    assert (rec.quality[served] == 100.0).all()


@pytest.mark.parametrize(
    "text, field",
    [("0.3", "SHARE:STRENGTH"), ("x:0.3-0.5", "SHARE:STRENGTH"), ("1.5:0.3-0.5", "SHARE"),
     ("0.3:0.8-0.3", "strengths"), ("0.3:0-0.5", "strengths")],
)  # fmt: skip
def test_a_bad_edit_mix_is_refused_naming_what_is_wrong(text, field):
    with pytest.raises(InputError, match=field):
        parse_edits(text)


def test_an_edit_mix_parses_a_range_and_a_single_strength():
    assert parse_edits("0.3:0.3-0.8") == EditMix(0.3, 0.3, 0.8)
    assert parse_edits("1:0.6") == EditMix(1.0, 0.6, 0.6)
