"""The offline bound: no schedule beats it (brute force on tiny instances), and it is tight
where a schedule is obvious."""

from itertools import permutations, product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptserve.profile import Profile
from promptserve.sim.oracle import oracle_bounds

FAST = Profile("fast", 10, (0, 5), (100.0, 90.0), (1, 2, 3), ((2.0, 3.0, 4.0), (1.0, 1.5, 2.0)))
SLOW = Profile("slow", 10, (0, 5), (100.0, 90.0), (1, 2, 3), ((5.0, 7.0, 9.0), (2.5, 3.5, 4.5)))
Q = np.array([[100.0, 80.0], [100.0, 90.0]])  # q[K_opt class, level]


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1 :]
        yield [[first], *part]


def schedulable(batches, gpus, arrival, deadline):
    """Whether some order and GPU choice runs every (level, members) batch in its members'
    windows; each batch starts as early as its GPU and its members allow."""
    for order in permutations(batches):
        for placement in product(range(len(gpus)), repeat=len(order)):
            free = [0.0] * len(gpus)
            ok = True
            for (level, members), g in zip(order, placement):
                start = max(free[g], max(arrival[m] for m in members))
                if len(members) > gpus[g].max_batch:
                    ok = False
                    break
                free[g] = start + gpus[g].batch_latency(level, len(members))
                if free[g] > min(deadline[m] for m in members) + 1e-9:
                    ok = False
                    break
            if ok:
                return True
    return False


def best_schedule(arrival, deadline, classes, gpus, no_neighbour=None):
    """(most quality, most requests) any schedule serves in time, by enumeration; a request
    with no neighbour runs at level 0 or not at all."""
    n, best_q, best_n = len(arrival), 0.0, 0
    for choice in product((None, 0, 5), repeat=n):
        if no_neighbour is not None and any(choice[i] == 5 and no_neighbour[i] for i in range(n)):
            continue
        served = [i for i in range(n) if choice[i] is not None]
        value = sum(Q[classes[i], (0, 5).index(choice[i])] for i in served)
        if value <= best_q and len(served) <= best_n:
            continue
        by_level = {k: [i for i in served if choice[i] == k] for k in (0, 5)}
        for p0 in set_partitions(by_level[0]):
            if any(
                schedulable([(0, b) for b in p0] + [(5, b) for b in p5], gpus, arrival, deadline)
                for p5 in set_partitions(by_level[5])
            ):
                best_q, best_n = max(best_q, value), max(best_n, len(served))
                break
    return best_q, best_n


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    requests=st.lists(
        st.tuples(st.floats(0, 6), st.floats(1, 8), st.integers(0, 1)), min_size=1, max_size=4
    ),
    gpus=st.lists(st.sampled_from([FAST, SLOW]), min_size=1, max_size=2),
    window=st.sampled_from([0.25, 1.0, 10.0]),
    misses=st.lists(st.booleans(), max_size=4),
)
def test_no_schedule_beats_the_bound(requests, gpus, window, misses):
    arrival = np.array([r[0] for r in requests])
    deadline = arrival + np.array([r[1] for r in requests])
    classes = np.array([r[2] for r in requests])
    no_neighbour = np.array((misses * 4)[: len(requests)]) if misses else None
    best_q, best_n = best_schedule(arrival, deadline, classes, gpus, no_neighbour)
    bound = oracle_bounds(
        arrival, deadline, np.array((0, 5))[classes], gpus, Q, window, no_neighbour
    )
    n = len(requests)
    assert bound["effective_quality_upper_bound"] >= best_q / n - 1e-3
    assert bound["slo_violation_ratio_lower_bound"] <= 1 - best_n / n + 1e-4


def test_gpu_groups_are_bounded_separately_not_by_their_average_cost():
    # the slow GPU cannot make a 3 s deadline at any level; the fast one serves both in time
    arrival, deadline = np.array([0.0, 0.0]), np.array([3.0, 3.0])
    best_q, _ = best_schedule(arrival, deadline, np.array([0, 0]), [FAST, SLOW])
    assert best_q == 200.0  # a batch of two at K=0 on the fast GPU takes 3 s
    bound = oracle_bounds(arrival, deadline, np.array([0, 0]), [FAST, SLOW], Q)
    assert bound["effective_quality_upper_bound"] == pytest.approx(100.0)


def test_fine_slots_do_not_let_work_spill_past_deadlines():
    # 40 requests at once with 4 s deadlines on one GPU: at most 3 finish in time at K=5
    # (one batch of 3 in 2 s, then a second in 2 s more: 6 images, all at quality 80 or 90)
    arrival = np.zeros(40)
    deadline = arrival + 4.0
    fine = oracle_bounds(arrival, deadline, np.full(40, 5), [FAST], Q, window_s=0.5)
    coarse = oracle_bounds(arrival, deadline, np.full(40, 5), [FAST], Q, window_s=10.0)
    assert fine["effective_quality_upper_bound"] == pytest.approx(6 * Q[1, 1] / 40, abs=0.01)
    assert coarse["effective_quality_upper_bound"] > fine["effective_quality_upper_bound"]


def test_a_request_with_no_neighbour_runs_from_noise_in_the_bound():
    # one request, 1.5 s to answer it: only level 5 (1 s) fits, and it needs a neighbour
    arrival, deadline = np.array([0.0]), np.array([1.5])
    with_one = oracle_bounds(arrival, deadline, np.array([5]), [FAST], Q)
    without = oracle_bounds(arrival, deadline, np.array([0]), [FAST], Q, no_neighbour=[True])
    assert with_one["effective_quality_upper_bound"] == pytest.approx(90.0)
    assert without["effective_quality_upper_bound"] == 0.0
    assert without["slo_violation_ratio_lower_bound"] == pytest.approx(1.0)
    # with 3 s it fits at level 0 (2 s), which is all a request without a neighbour may use
    roomy = oracle_bounds(arrival, arrival + 3.0, np.array([0]), [FAST], Q, no_neighbour=[True])
    assert roomy["effective_quality_upper_bound"] == pytest.approx(100.0)


def test_the_bound_caches_a_prompt_no_sooner_than_it_could_be_answered():
    from promptserve.cache.thresholds import shipped_thresholds
    from promptserve.sim.compare import oracle_neighbours
    from promptserve.sim.oracle import earliest_answer_s
    from promptserve.types import Request

    thresholds = shipped_thresholds("clip")
    soonest = earliest_answer_s([FAST])
    assert soonest == pytest.approx(1.0)  # FAST alone at level 5
    twin = np.ones((1, 8), np.float32) / np.sqrt(8)
    other = np.eye(8, dtype=np.float32)[:1]
    # a twin of request 0 arrives before 0 could be answered, another twin after; a prompt of
    # another tenant never sees them
    times = [0.0, 0.5, 1.0, 2.0]
    tenants = ["a", "a", "a", "b"]
    prompts = ["p", "p twin", "p twin 2", "q"]
    reqs = [
        Request(i, t, p, ten, t + 20) for i, (t, p, ten) in enumerate(zip(times, prompts, tenants))
    ]
    emb = np.concatenate([twin, twin, twin, other])
    k_opt, found = oracle_neighbours(reqs, emb, thresholds, None, soonest)
    assert found.tolist() == [False, False, True, False]
    assert k_opt[2] == thresholds.levels[0] and k_opt[1] == 0
    # with the warm prompts cached before the first arrival, everyone of that tenant has one
    k_warm, found_warm = oracle_neighbours(reqs, emb, thresholds, (["w"], twin), soonest)
    assert found_warm.tolist() == [True, True, True, False]
    assert k_warm[0] == thresholds.levels[0]


# batches of its steps: b members, N - K steps of step(b), and each member's join and leave
STEPPY = Profile(
    "steppy",
    4,
    (0, 2),
    (100.0, 90.0),
    (1, 2, 3),
    ((4.1, 5.0, 6.3), (2.1, 2.6, 3.3)),
    step_inflight=(1, 2, 3),
    step_latency_s=(1.0, 1.2, 1.5),
    encode_s=0.05,
    decode_s=0.05,
)


def cheapest_member(profile, k, window):
    """Fewest GPU-seconds one member spends over every sequence of in-flight counts for its
    steps that fits its window (by enumeration): what ``step_cost`` must not exceed."""
    from itertools import combinations_with_replacement

    steps, step_s = profile.total_steps - k, profile.step_latency_s
    fixed = profile.encode_s + profile.decode_s
    best = float("inf")
    for counts in combinations_with_replacement(range(1, len(step_s) + 1), steps):
        if sum(step_s[n - 1] for n in counts) + fixed <= window + 1e-9:
            best = min(best, sum(step_s[n - 1] / n for n in counts) + fixed)
    return best


@pytest.mark.parametrize("window", [3.0, 4.2, 5.0, 5.2, 5.5, 6.1, 9.0])
@pytest.mark.parametrize("k", [0, 2])
def test_no_sequence_of_step_counts_costs_a_member_less_than_the_step_cost(k, window):
    from promptserve.sim.oracle import step_cost

    bound, best = step_cost(STEPPY, k, window), cheapest_member(STEPPY, k, window)
    assert bound <= best + 1e-9
    if best == float("inf"):
        assert bound == float("inf")  # nothing fits, not even alone
    else:
        assert bound >= best - 0.25  # the LP relaxation, not a looser one


def test_a_member_mixing_counts_beats_every_batch_that_fits_and_the_bound_allows_it():
    from promptserve.sim.oracle import batch_cost, per_image_cost, step_cost

    # in 5.4 s: 3 steps with 2 members and 1 with 3 (5.2 s with join and leave), at
    # 3 x 0.6 + 0.5 + 0.1 = 2.4 GPU-s; the best batch that fits is 2 (5.0 s) at 2.5 each
    mixed = 3 * 1.2 / 2 + 1.5 / 3 + 0.1
    assert cheapest_member(STEPPY, 0, 5.4) == pytest.approx(mixed)
    assert batch_cost(STEPPY, 0, 5.4) == pytest.approx(2.5)
    assert per_image_cost(STEPPY, 0, 5.4) == step_cost(STEPPY, 0, 5.4) <= mixed


@pytest.mark.parametrize("window", [2.0, 3.0, 4.2, 6.0])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_no_member_at_an_interval_costs_less_than_the_relaxed_step_cost(r, window):
    """By enumeration: every sequence of in-flight counts for a member's steps, one step in r
    full (the rest cached at 0.3 of a full one) and in any order, that fits its window."""
    from dataclasses import replace
    from itertools import product as every

    from promptserve.sim.oracle import relaxed_step_cost

    prof = replace(STEPPY, cached_step_share=0.3, feature_r_max=3)
    for k in (0, 2):
        steps, step_s = prof.total_steps - k, prof.step_latency_s
        full = -(-steps // r)  # a run's first step is full, then one in r
        fixed, best = prof.encode_s + prof.decode_s, float("inf")
        for counts in every(range(1, len(step_s) + 1), repeat=steps):
            for kinds in set(permutations([1] * full + [0] * (steps - full))):
                share = [1.0 if f else 0.3 for f in kinds]
                took = sum(step_s[n - 1] * c for n, c in zip(counts, share)) + fixed
                if took <= window + 1e-9:
                    spent = sum(step_s[n - 1] * c / n for n, c in zip(counts, share)) + fixed
                    best = min(best, spent)
        bound = relaxed_step_cost(prof, k, r, window)
        assert bound <= best + 1e-9, (k, bound, best)
        if best == float("inf"):
            assert bound == float("inf") or full * step_s[0] + fixed > window
