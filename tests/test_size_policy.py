"""The policy's side of serving several sizes: the per-size step cost, shape-aware placement,
one size per pinned batch, the rate a pinned plan counts, and the simulator on a size mix."""

import dataclasses

import numpy as np
import pytest

from factories import boundary
from promptserve.engine.base import GenerationItem, Look
from promptserve.engine.modeled import ModeledEngine
from promptserve.engine.sizes import shape_index, shape_table
from promptserve.policy import Setting, Status, get_policy
from promptserve.policy.contract import Ask
from promptserve.policy.dispatcher import DispatchConfig, Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Demand, Job
from promptserve.profile import for_sizes, reference_profile
from promptserve.quality import quality_model
from promptserve.sim.simulator import simulate
from promptserve.steptime import StepProfile, finishes, kind
from promptserve.workload.looks import LookMix, sized_profile, with_looks
from test_stepwise import poisson

SIZES = ((1024, 1024), (1152, 896), (512, 512))
PROFILE = for_sizes(reference_profile(), SIZES)
QM = quality_model(PROFILE.levels, PROFILE.quality, "steep")


def test_a_call_counts_a_size_by_its_pixels_and_a_mixed_batch_pays_a_call_per_size():
    sp = StepProfile(10, (0, 5), (1.0, 1.5, 2.0, 2.5), shape_weights=(1.0, 0.5, 2.0))
    assert [sp.call_s(n) for n in (1, 2, 3, 4)] == list(sp.step_s)  # the measured points
    assert sp.call_s(0.5) == pytest.approx(0.75)  # below one member: the first segment's line
    assert sp.call_s(5.0) == pytest.approx(3.0)  # past the last count: its segment's line
    assert sp.mix_s({0: 3}) == sp.iteration_s(3)
    assert sp.mix_s({kind(2): 2}) == pytest.approx(sp.call_s(4.0))  # two of twice the pixels
    # two sizes, one call each: each pays the fixed part of a call
    assert sp.mix_s({0: 2, kind(1): 2}) == pytest.approx(sp.call_s(2.0) + sp.call_s(1.0))
    assert sp.mix_s({0: 2, kind(1): 2}) > sp.call_s(3.0)
    # the finish walk with sizes: the same as without when all are native, and a member of
    # another size slows every step it shares
    assert finishes(sp, 0.0, [1, 3], shapes=[0, 0]) == finishes(sp, 0.0, [1, 3])
    mixed = finishes(sp, 0.0, [1, 3], shapes=[kind(1), 0])
    assert mixed[0] == pytest.approx(sp.call_s(0.5) + sp.call_s(1.0))
    assert mixed[1] == pytest.approx(mixed[0] + 2 * sp.call_s(1.0))


def test_a_batch_of_one_size_is_timed_as_its_pixel_count_of_native_images():
    ref = reference_profile()
    assert PROFILE.sized_latency(0, 4, 0) == ref.batch_latency(0, 4)
    assert PROFILE.sized_latency(0, 4, 2) == pytest.approx(ref.batch_latency(0, 1), rel=0.01)
    w = PROFILE.shape_weights[1]
    assert PROFILE.sized_latency(10, 2, 1) < PROFILE.sized_latency(10, 2, 0)
    assert w == pytest.approx(1152 * 896 / 1024**2)


def scheduler(shape_aware: bool) -> StepScheduler:
    from promptserve.steptime import step_profile

    config = StepConfig("zero", shed=True, admission=False, shape_aware=shape_aware)
    sp = step_profile(for_sizes(reference_profile(), SIZES[:2]))
    return StepScheduler(sp, 2, QM.matrix(), config, LoadEstimator(PROFILE.levels))


@pytest.mark.parametrize("aware", [True, False])
def test_placement_weighs_a_gpu_already_running_the_requests_size(aware):
    """GPU 0 runs three 1024x1024 members, GPU 1 two 1152x896 ones. A 1024x1024 arrival on
    GPU 1 would add a call of its own to every step there; on GPU 0 one member to a call it
    already makes, which delays the others less. Size-blind placement takes the GPU with
    fewer members."""
    sched = scheduler(aware)
    for i, shape in enumerate([0, 1, 0, 1, 0]):
        arrival = sched.intake(0.0, Ask(i, 60.0, 0, False, shape))
        assert arrival.ended is None
    assert [sorted(j.shape for j in g.joining) for g in sched.gpus] == [[0, 0, 0], [1, 1]]
    arrival = sched.intake(0.0, Ask(9, 60.0, 0, False, 0))
    assert arrival.gpu == (0 if aware else 1)
    if aware:  # 4 and 2 members now: the other size goes where it runs and fewer are
        assert sched.intake(0.0, Ask(10, 60.0, 0, False, 1)).gpu == 1


def test_a_running_batch_of_two_sizes_steps_at_the_sum_of_their_calls():
    sched = scheduler(True)
    sched.intake(0.0, Ask(0, 60.0, 0, False, 0))
    sched.intake(0.0, Ask(1, 60.0, 0, False, 1))  # GPU 1 (GPU 0 holds one)
    sched.intake(0.0, Ask(2, 60.0, 0, False, 1))
    gpu = sched.gpus[1]
    boundary(sched, gpu, 0.0, 0)
    sp = sched.profile
    assert gpu.shapes == {kind(1): 2}
    assert gpu.seg_iter_s == pytest.approx(sp.call_s(2 * sp.shape_weights[1]))
    sched.remove(1)  # a cancel keeps the count of sizes
    assert gpu.shapes == {kind(1): 1}


def test_a_pinned_batch_holds_one_size_and_is_timed_for_it():
    d = Dispatcher.create([PROFILE], DispatchConfig(max_batch=8))
    d.set_levels(0.0, [0])
    for i, shape in enumerate([2, 0, 2, 0, 2]):
        d.enqueue(Job(i, 0.0, 100.0 + i, 0, 0, 0, shape))
    dispatches, _ = d.step(0.0)
    (batch,) = dispatches
    assert {j.shape for j in batch.jobs} == {2} and len(batch.jobs) == 3  # the head's size
    assert batch.until_s == pytest.approx(PROFILE.sized_latency(0, 3, 2))
    d.on_batch_done(batch.until_s, batch)
    (second,), _ = d.step(batch.until_s)
    assert {j.shape for j in second.jobs} == {0} and len(second.jobs) == 2


def test_a_pinned_plan_counts_the_rate_in_native_images():
    est = LoadEstimator(PROFILE.levels, 10.0, 60.0)
    for i in range(60):
        est.observe(float(i), 0, PROFILE.shape_weights[2 if i % 2 else 0])
    demand = est.estimate(60.0)
    assert demand.size_weight == pytest.approx((1.0 + 0.25) / 2)
    est.observe(200.0, 0)  # the old arrivals leave the window, their weights with them
    assert est.estimate(200.0).size_weight == 1.0
    setting = Setting((PROFILE,) * 2, QM.matrix(), 21.0)
    policy = get_policy("argus")
    heavy = Demand(200.0, demand.mix, size_weight=2.0)
    light = Demand(400.0, demand.mix)
    assert policy.plan(heavy, setting) == policy.plan(light, setting)


def test_the_modelled_step_runner_steps_at_its_members_sizes():
    engine = ModeledEngine(reference_profile(), sleep=lambda s: None)
    engine.set_sizes(SIZES)
    slept: list[float] = []
    runner = engine.step_runner(reference_profile())
    runner._sleep = slept.append
    runner.join([
        (0, GenerationItem("a", 0, look=Look())),
        (1, GenerationItem("b", 0, look=Look(size=(512, 512)))),
    ])  # fmt: skip
    slept.clear()
    runner.step()
    sp = runner.profile
    assert slept == [pytest.approx((sp.call_s(1.0) + sp.call_s(0.25)) / engine.speedup)]
    table = shape_table((1024, 1024), SIZES)
    assert shape_index(table, None) == 0 and shape_index(table, (512, 512)) == 2


@pytest.mark.parametrize("name", ["promptserve-step", "promptserve-step+blind", "promptserve"])
def test_the_simulator_serves_a_size_mix_and_ends_every_request(name):
    inputs = poisson(60, 4, gpus=2)
    mix = LookMix(SIZES, (0.6, 0.2, 0.2))
    requests = with_looks(inputs.requests, mix, seed=1)
    shapes = np.array([r.shape for r in requests])
    assert set(shapes) == {0, 1, 2}
    profile = sized_profile(reference_profile(), mix)
    setting = dataclasses.replace(inputs.setting, profiles=(profile,) * 2)
    sized = dataclasses.replace(inputs, requests=requests, setting=setting)
    result = simulate(get_policy(name), sized)
    assert (result.records.status >= Status.SERVED).all()
    served = result.records.status == Status.SERVED
    assert served.mean() > 0.9


def test_blind_is_only_for_step_level_policies():
    from promptserve.errors import InputError

    with pytest.raises(InputError, match=r"\+blind is for step-level"):
        get_policy("argus+blind")
    assert (
        not get_policy("promptserve-step+blind")
        .step_scheduler(Setting((PROFILE,), QM.matrix(), 21.0))
        .config.shape_aware
    )


@pytest.mark.parametrize("slack", [True, False])
def test_a_waiting_job_is_left_to_the_gpu_running_its_size_while_it_has_slack(slack):
    sched = scheduler(True)
    for i, shape in enumerate([0, 1]):  # GPU 0 runs a 1024x1024 member, GPU 1 a 1152x896
        sched.intake(0.0, Ask(i, 60.0, 0, False, shape))
    for gpu in sched.gpus:
        boundary(sched, gpu, 0.0, 0)
    assert [g.shapes for g in sched.gpus] == [{0: 1}, {kind(1): 1}]
    # a 1152x896 job waits: its whole SLO ahead (21 s), or just its run on GPU 0 and a little
    sp = sched.profile
    run = 50 * (sp.call_s(1.0) + sp.call_s(sp.shape_weights[1]))
    deadline = 21.0 if slack else run + 0.5
    sched.queue.push(Job(5, 0.0, deadline, 0, 0, 0, 1))
    _, joined, _ = boundary(sched, sched.gpus[0], 0.0, 0)
    if slack:  # GPU 0 leaves it to GPU 1, which takes it at its own boundary
        assert joined == [] and len(sched.queue) == 1
        _, joined, _ = boundary(sched, sched.gpus[1], 0.0, 0)
    assert [m.job.id for m in joined] == [5]


def test_the_price_is_per_step_second_so_a_smaller_size_keeps_more_of_its_steps():
    config = StepConfig("price", shed=True, admission=True)
    from promptserve.steptime import step_profile

    sp = step_profile(for_sizes(reference_profile(), ((1024, 1024), (512, 512))))
    sched = StepScheduler(sp, 2, QM.matrix(), config, LoadEstimator(PROFILE.levels))
    for i in range(40):  # half of each size
        sched.intake(float(i), Ask(i, float(i) + 21.0, 0, True, i % 2))
    mix = (0.2, 0.2, 0.2, 0.2, 0.1, 0.1)
    price = sched.reprice(Demand(100.0, mix), 21.0)
    assert 0 < price < 50
    (big, _), (small, _) = sched.pricing.by_shape
    rows = range(len(sp.levels))
    last = len(sp.levels) - 1
    assert all(small[i][last] <= big[i][last] for i in rows)  # never faster for fewer pixels
    assert any(small[i][last] < big[i][last] for i in rows)


def test_a_gpu_takes_no_more_pixels_than_its_bound_and_the_rest_wait():
    """``--max-inflight-megapixels``: on one GPU bounded at two 1024x1024 images, two
    native joins fit, a third waits; a 512x512 (a quarter) waits too, and everyone joins
    once the members leave. A request alone always runs, whatever its size."""
    from promptserve.steptime import step_profile

    profile = dataclasses.replace(PROFILE, max_inflight_weight=2.0)
    sp = step_profile(profile)
    assert sp.max_weight == 2.0
    config = StepConfig("zero", shed=True, admission=False)
    sched = StepScheduler(sp, 1, QM.matrix(), config, LoadEstimator(PROFILE.levels))
    placed = [
        sched.intake(0.0, Ask(i, 600.0, 0, False, shape)).gpu
        for i, shape in enumerate([0, 0, 0, 2])
    ]
    assert placed == [0, 0, None, None]  # the third and the small one wait
    gpu = sched.gpus[0]
    boundary(sched, gpu, 0.0, 0)
    assert sorted(gpu.by_id) == [0, 1] and sched.pending() == 4
    sched.remove(0), sched.remove(1)  # they leave (cancelled): the waiting ones join
    boundary(sched, gpu, 1.0, 0)
    assert sorted(j.id for j in gpu.joining) + sorted(gpu.by_id) == [2, 3]
    unbounded = StepScheduler(
        step_profile(PROFILE), 1, QM.matrix(), config, LoadEstimator(PROFILE.levels)
    )
    assert [unbounded.intake(0.0, Ask(i, 600.0, 0, False, 0)).gpu for i in range(3)] == [0, 0, 0]
    huge = dataclasses.replace(PROFILE, max_inflight_weight=0.1)
    alone = StepScheduler(step_profile(huge), 1, QM.matrix(), config, LoadEstimator(PROFILE.levels))
    assert alone.intake(0.0, Ask(0, 600.0, 0, False, 0)).gpu == 0  # over the bound, but alone
