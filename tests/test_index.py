import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptserve.cache.index import CacheIndex, latent_key
from promptserve.cache.vectors import AutoVectors, ExactVectors, USearchVectors

LEVELS = (5, 10, 15, 20, 25)


def unit(rng, n, dim=16):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_nearest_finds_the_same_prompt_with_similarity_one():
    rng = np.random.default_rng(0)
    vecs = unit(rng, 50)
    idx = CacheIndex(dim=16)
    for i, v in enumerate(vecs):
        idx.insert("t", f"p{i}", v, LEVELS, now_s=i)
    m = idx.nearest("t", vecs[17])
    assert m is not None and m.entry.prompt == "p17" and m.similarity == pytest.approx(1.0)
    assert idx.nearest("other", vecs[17]) is None


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alice", "bob", "eve"]), st.integers(0, 10**6)),
        min_size=1,
        max_size=40,
    )
)
def test_tenants_never_see_each_others_entries(ops):
    idx = CacheIndex(dim=16, capacity=15)
    for i, (tenant, seed) in enumerate(ops):
        v = unit(np.random.default_rng(seed), 1)[0]
        match = idx.nearest(tenant, v)
        assert match is None or match.entry.tenant == tenant
        idx.insert(tenant, f"{tenant}-{i}", v, LEVELS, now_s=i)
    assert len(idx) == min(len(ops), 15)


def test_lcbfu_evicts_the_lowest_hits_times_k():
    rng = np.random.default_rng(1)
    idx = CacheIndex(dim=16, capacity=3)
    a, b, c = (
        idx.insert("t", n, v, LEVELS, 0.0).entry for n, v in zip("abc", unit(rng, 3), strict=True)
    )
    idx.record_hit(a.id, 25, now_s=1.0)  # score 0.5
    idx.record_hit(b.id, 5, now_s=2.0)  # score 0.1
    idx.record_hit(b.id, 5, now_s=3.0)  # score 0.2; c has 0
    out = idx.insert("t", "d", unit(rng, 1)[0], LEVELS, 4.0)
    assert [e.prompt for e in out.evicted] == ["c"]
    out = idx.insert("t", "e", unit(rng, 1)[0], LEVELS, 5.0)
    assert [e.prompt for e in out.evicted] == ["d"]  # new entry, no hits yet: lowest score
    out = idx.insert("t", "f", unit(rng, 1)[0], LEVELS, 6.0)
    assert [e.prompt for e in out.evicted] == ["e"]
    assert {e.prompt for e in idx} == {"a", "b", "f"}
    assert a.score == pytest.approx(0.5) and b.hits == 2


def test_lru_evicts_the_least_recently_used():
    rng = np.random.default_rng(2)
    idx = CacheIndex(dim=16, capacity=2, eviction="lru")
    a = idx.insert("t", "a", unit(rng, 1)[0], LEVELS, 0.0).entry
    idx.insert("t", "b", unit(rng, 1)[0], LEVELS, 1.0)
    idx.record_hit(a.id, 5, now_s=2.0)
    out = idx.insert("t", "c", unit(rng, 1)[0], LEVELS, 3.0)
    assert [e.prompt for e in out.evicted] == ["b"]


def test_latent_keys_hide_the_tenant_and_name_each_level():
    idx = CacheIndex(dim=16)
    e = idx.insert("../../etc/passwd", "p", unit(np.random.default_rng(3), 1)[0], LEVELS, 0.0).entry
    assert set(e.latent_keys) == set(LEVELS)
    assert all("passwd" not in key and ".." not in key for key in e.latent_keys.values())
    assert e.latent_keys[10] == latent_key("../../etc/passwd", e.id, 10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=60))
def test_exact_vectors_match_brute_force_after_adds_and_removes(ops):
    rng = np.random.default_rng(4)
    pool = unit(rng, 31)
    vecs, live = ExactVectors(16), set()
    for add, i in ops:
        if add and i not in live:
            vecs.add(np.array([i]), pool[i : i + 1])
            live.add(i)
        elif not add:
            vecs.remove(np.array([i]))
            live.discard(i)
    q = unit(rng, 5)
    sims, ids = vecs.search(q)
    assert len(vecs) == len(live)
    if not live:
        assert np.all(ids == -1)
        return
    ref = sorted(live)
    best = np.array(ref)[np.argmax(q @ pool[ref].T, axis=1)]
    assert np.array_equal(ids, best)


def test_auto_vectors_move_to_ivf_and_still_find_near_duplicates():
    rng = np.random.default_rng(5)
    base = unit(rng, 3000, dim=32)
    vecs = AutoVectors(32, ann_threshold=2000)
    vecs.add(np.arange(3000), base)
    assert vecs.approximate
    noisy = base[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    _, ids = vecs.search(noisy)
    assert np.mean(ids == np.arange(200)) > 0.97
    vecs.remove(np.arange(100))
    _, ids = vecs.search(base[:100])
    assert not np.isin(ids, np.arange(100)).any()


def test_usearch_backend_finds_most_exact_duplicates():
    rng = np.random.default_rng(6)
    base = unit(rng, 500, dim=32)
    vecs = USearchVectors(32)
    vecs.add(np.arange(500), base)
    sims, ids = vecs.search(base[:50])
    hit = ids == np.arange(50)
    assert hit.mean() >= 0.9  # HNSW is approximate: it can miss even an exact duplicate
    assert np.allclose(sims[hit], 1.0, atol=1e-4)
