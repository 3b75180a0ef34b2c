"""A Ray worker replica's class, without Ray: it reads start latents from the shared store and
writes what it captures there, so latents never pass through the ingress."""

import asyncio

import numpy as np

from promptserve.cache.approx import ApproxCache
from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.distributed.replica import EngineWorker
from promptserve.engine.base import GenerationItem
from promptserve.workers.base import StoreRefs


def run(worker, items, refs):
    async def collect():
        return [event async for event in worker.generate(items, refs)]

    events = asyncio.run(collect())
    assert events[-1][0] == "done"
    return [e for e in events if e[0] == "step"], events[-1][1]


def test_worker_writes_captures_to_the_store_and_resumes_from_it(tmp_path):
    embedder = HashingEmbedder()
    cache = ApproxCache(
        tmp_path / "cache", embedder.dim, shipped_thresholds("minilm"), total_steps=20
    )
    worker = EngineWorker(0, "tiny", None, "cpu", store_root=str(cache.store.root))
    vec = embedder.embed(["a red fox"])[0]

    entry_id = cache.reserve()
    steps, [first] = run(
        worker, [GenerationItem("a red fox", 0, seed=3)], [StoreRefs(None, "t", entry_id)]
    )
    assert len(steps) == 20 and first.latents == {}  # nothing but the image comes back
    assert sorted(first.stored) == [2, 4, 6, 8, 10] and all(b > 0 for b in first.stored.values())
    entry = cache.commit("t", "a red fox", vec, entry_id, first.stored, 0.0)
    assert cache.lookup("t", vec).entry.id == entry.id

    # resumed at K=10 from the stored latent, it ends where the full run ended
    again_id = cache.reserve()
    steps, [again] = run(
        worker,
        [GenerationItem("a red fox", 10, None, seed=3)],
        [StoreRefs(entry.latent_keys[10], "t", again_id)],
    )
    assert again.k == 10 and len(steps) == 10
    assert np.abs(again.final_latent - first.final_latent).max() <= 1e-5
    assert sorted(again.stored) == [10]  # the start latent is kept for the new entry too
    # committed, the entry takes the levels below 10 from the neighbour it started from
    resumed = cache.commit("t", "a red fox!", vec, again_id, again.stored, 1.0, entry)
    assert sorted(resumed.latent_keys) == [2, 4, 6, 8, 10]
    assert np.array_equal(cache.latent(resumed, 4), cache.latent(entry, 4))

    # a start latent that is gone: the worker runs from noise and says so (K = 0)
    cache.store.delete(entry.latent_keys[8])
    _, [fallback] = run(
        worker,
        [GenerationItem("a red fox", 8, None, seed=3)],
        [StoreRefs(entry.latent_keys[8], "t", cache.reserve())],
    )
    assert fallback.k == 0 and fallback.store_error is None


def test_two_prompts_of_one_tenant_in_one_batch_get_their_own_entries(tmp_path):
    embedder = HashingEmbedder()
    cache = ApproxCache(
        tmp_path / "cache", embedder.dim, shipped_thresholds("minilm"), total_steps=20
    )
    worker = EngineWorker(0, "tiny", None, "cpu", store_root=str(cache.store.root))
    prompts = ["a red fox", "a blue whale"]
    ids = [cache.reserve(), cache.reserve()]
    assert ids[0] != ids[1]
    items = [GenerationItem(p, 0, seed=3) for p in prompts]
    _, results = run(worker, items, [StoreRefs(None, "t", i) for i in ids])
    entries = [
        cache.commit("t", p, embedder.embed([p])[0], i, r.stored, 0.0)
        for p, i, r in zip(prompts, ids, results)
    ]
    assert [e.id for e in entries] == ids
    for prompt, entry, first in zip(prompts, entries, results):
        assert cache.lookup("t", embedder.embed([prompt])[0]).entry.id == entry.id
        _, [again] = run(
            worker,
            [GenerationItem(prompt, 10, None, seed=3)],
            [StoreRefs(entry.latent_keys[10], "t", cache.reserve())],
        )
        # each resumes from its own latent: it ends where its own full run ended (the full run
        # was a batch of two, the resume a batch of one: float32 kernels differ by batch shape,
        # by about 1e-6 of the latent's magnitude, 12)
        assert again.k == 10
        assert np.abs(again.final_latent - first.final_latent).max() <= 1e-4
    assert np.abs(results[0].final_latent - results[1].final_latent).max() > 1e-3


def test_a_replica_runs_one_batch_at_a_time_and_reports_each_call(tmp_path):
    worker = EngineWorker(0, "tiny", None, "cpu")
    engine, active, seen = worker.engine, [0], []

    class Probe:  # counts batches inside the engine at once, and what ping says meanwhile
        name, total_steps, levels = engine.name, engine.total_steps, engine.levels

        def generate(self, items, on_step=None):
            active[0] += 1
            seen.append((active[0], worker.ping()["running"], worker.ping()["waiting"]))
            try:
                return engine.generate(items, on_step)
            finally:
                active[0] -= 1

    worker.engine = Probe()

    async def both():
        async def one(n):
            items = [GenerationItem(f"a fox {i}", 0, seed=i) for i in range(n)]
            return [e async for e in worker.generate(items)]

        return await asyncio.gather(one(2), one(3))

    first, second = asyncio.run(both())
    assert first[-1][0] == "done" and second[-1][0] == "done"
    assert [a for a, _, _ in seen] == [1, 1]  # never two batches on one engine
    assert sorted((r, w) for _, r, w in seen) == [(2, 3), (3, 0)]  # the other call waited
    assert worker.ping()["running"] == 0 and worker.ping()["waiting"] == 0
