"""The metrics observer: what ``/metrics`` and the dashboard show, read from the runtime's
``load()``, its counters and the cache's stats, never from the scheduler's insides."""

from __future__ import annotations

import asyncio
import logging
import time

from promptserve.engine.adapterbank import residency_stats
from promptserve.engine.sizes import label
from promptserve.server.metrics import History, Metrics, exposition
from promptserve.server.runtime import LiveRuntime
from promptserve.server.selection import SelectionStats

log = logging.getLogger(__name__)


def running_by_size(runtime: LiveRuntime) -> dict[str, int]:
    """Requests running now per size (every listed size, 0 where none runs)."""
    workers = runtime.workers
    counts = {label(s): 0 for s in workers.sizes}
    for p in list(runtime.pending.values()):
        if p.started is not None:
            size = label(p.look.size or workers.native)
            counts[size] = counts.get(size, 0) + 1
    return counts


def scrape(runtime: LiveRuntime, metrics: Metrics) -> bytes:
    """Copy the runtime's state into the gauges; the exposition text."""
    load = runtime.load()
    for k, n in load.queued.items():
        metrics.queue.labels(str(k)).set(n)
    for k, n in load.per_level.items():
        metrics.gpus.labels(str(k)).set(n)
    for gpu, count in enumerate(load.inflight):
        metrics.inflight.labels(str(gpu)).set(count)
    metrics.workers_up.set(load.gpus_up)
    for size, count in running_by_size(runtime).items():
        metrics.running_by_size.labels(size).set(count)
    engines = getattr(runtime.workers, "engines", ())
    if runtime.workers.adapters and engines:
        for event, n in residency_stats(engines).items():
            metrics.adapter_residency.labels(event.rstrip("s")).set(n)
    c = runtime.counters
    metrics.hit_ratio.set(c.cache_hits / c.lookups if c.lookups else 0.0)
    metrics.planner.set(c.planner_ms[-1] if c.planner_ms else 0.0)
    metrics.retried.set(c.retried)
    metrics.cache_failures.set(c.cache_update_failures)
    metrics.loop_errors.set(c.loop_errors)
    metrics.batch_timeouts.set(c.batch_timeouts)
    metrics.reintervals.set(c.reintervals)
    for state, n in (
        ("running", load.batch_running), ("waiting", load.batch_waiting),
        ("paused", c.pauses), ("resumed", c.resumes),
    ):  # fmt: skip
        metrics.background.labels(state).set(n)
    metrics.write_groups.set(c.write_trips)
    for stage, (seconds, requests) in list(c.stages.items()):
        metrics.stage_seconds.labels(stage).set(seconds)
        metrics.stage_requests.labels(stage).set(requests)
    metrics.skipped.set(runtime.cache.skipped_writes)
    stats = runtime.cache.stats()
    metrics.cache_bytes.set(stats["bytes"])
    metrics.cache_quota.set(stats["quota_bytes"] or 0)
    metrics.cache_entries.set(stats["entries"])
    metrics.evictions.set(stats["evictions"])
    metrics.evicted_bytes.set(stats["evicted_bytes"])
    metrics.embed_rows.set(getattr(runtime.embedder, "rows", 0))  # a cached embedder's
    if runtime.selection is not None:
        selection(runtime.selection.stats, metrics)
    return exposition(metrics)


def selection(stats: SelectionStats, metrics: Metrics) -> None:
    """``+select``: the rule serving, each candidate's last replay, what the selector did."""
    for name in stats.candidates:
        metrics.selector_chosen.labels(name).set(int(name == stats.chosen))
        if name in stats.scores:
            metrics.selector_score.labels(name).set(stats.scores[name])
    metrics.selector_events.labels("selection").set(stats.selections)
    metrics.selector_events.labels("switch").set(stats.switches)
    for reason, n in stats.skipped.items():
        metrics.selector_events.labels(f"skipped_{reason}").set(n)
    metrics.selector_cpu.set(stats.cpu_s)


async def record(runtime: LiveRuntime, metrics: Metrics, history: History) -> None:
    """``/metrics`` once a second into the history the dashboard reloads from."""
    while True:
        try:
            history.record(time.time() * 1000, scrape(runtime, metrics))
        except Exception:  # one bad reading must not end the history for good
            log.exception("reading the metrics for the history failed; next try in 1 s")
            runtime.counters.loop_errors += 1
        await asyncio.sleep(1.0)
