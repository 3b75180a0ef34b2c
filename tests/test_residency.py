"""The policy's model of each GPU's bounded LoRA residency (``policy.residency``): loads
counted before a first step, a GPU's running members within its rows, placement that weighs
where an adapter already sits, pinned batches within the rows."""

import pytest

from factories import boundary
from promptserve.policy.contract import Ask
from promptserve.policy.dispatcher import DispatchConfig, Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.residency import ResidentSet
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Job
from promptserve.profile import for_adapters, reference_profile
from promptserve.quality import quality_model
from promptserve.steptime import step_profile

PROFILE = for_adapters(reference_profile(), slots=2, load_s=0.5)
QM = quality_model(PROFILE.levels, PROFILE.quality, "steep")


def test_a_resident_set_loads_over_the_oldest_adapter_no_member_names():
    held = ResidentSet(2)
    assert held.use([1]) == 1 and held.use([2]) == 1 and held.use([1]) == 0
    assert held.missing([1, 2, 3]) == 1 and not held.room_for([3])  # 1 and 2 are running
    held.release([2])
    assert held.room_for([3]) and held.use([3]) == 1  # over 2, which nobody runs
    assert list(held.lru) == [1, 3]
    assert ResidentSet(0).use([1, 2, 3]) == 0  # unbounded: nothing to load


def scheduler(shed: bool = True) -> StepScheduler:
    config = StepConfig("zero", shed=shed, admission=False)
    return StepScheduler(
        step_profile(PROFILE), 2, QM.matrix(), config, LoadEstimator(PROFILE.levels)
    )


def test_a_join_waits_for_its_adapters_load_and_placement_prefers_where_it_sits():
    sched = scheduler()
    sched.intake(0.0, Ask(0, 60.0, 0, False, 0, (1,)))  # GPU 0
    gpu = sched.gpus[0]
    boundary(sched, gpu, 0.0, 0)
    assert gpu.seg_start == pytest.approx(sched.profile.join_s + 0.5)  # its load, then a step
    sched.intake(0.0, Ask(1, 60.0, 0, False, 0, (2,)))  # GPU 1 (fewer members)
    boundary(sched, sched.gpus[1], 0.0, 0)
    # a third for adapter 1: GPU 0 holds it, GPU 1 would load it and delay its member
    assert sched.intake(0.0, Ask(2, 60.0, 0, False, 0, (1,))).gpu == 0


@pytest.mark.parametrize("shed", [True, False])
def test_a_gpu_never_runs_more_distinct_adapters_than_its_rows(shed):
    sched = scheduler(shed)
    for i, adapter in enumerate([1, 2, 3, 1, 2, 3]):
        sched.intake(0.0, Ask(i, 600.0, 0, False, 0, (adapter,)))
        for gpu in sched.gpus:
            boundary(sched, gpu, 0.0, 0)
    for gpu in sched.gpus:
        named = {a for m in gpu.by_id.values() for a in m.job.adapters}
        assert len(named) <= 2
    assert sched.pending() == 6  # nobody lost: what does not fit waits


def test_a_pinned_batch_names_at_most_the_rows_and_counts_its_loads():
    d = Dispatcher.create([PROFILE], DispatchConfig(max_batch=8))
    d.set_levels(0.0, [0])
    for i, adapter in enumerate([1, 2, 3, 1]):
        d.enqueue(Job(i, 0.0, 100.0 + i, 0, 0, 0, 0, (adapter,)))
    (batch,), _ = d.step(0.0)
    assert {a for j in batch.jobs for a in j.adapters} == {1, 2}  # 3 waits for a later batch
    assert batch.until_s == pytest.approx(PROFILE.batch_latency(0, 3) + 2 * 0.5)


def test_a_private_set_loads_every_joins_adapters_whoever_used_them():
    """``--lora-private``: a join counts a load for each of its adapters, resident or not, so
    another tenant's use a moment ago (shared: a hit) changes nothing."""
    shared, private = ResidentSet(2), ResidentSet(2, private=True)
    for held in (shared, private):
        assert held.use([1]) == 1
        held.release([1])
    assert shared.missing([1]) == 0 and shared.use([1]) == 0  # another tenant's trace
    assert private.missing([1]) == 1 and private.use([1]) == 1  # the same for everyone
    assert private.missing([1, 2, 2]) == 2 and private.use([1, 2]) == 2
    assert list(private.lru) == [1, 2]  # still held: the bound on rows is unchanged
