"""The Prometheus series ``/metrics`` exposes; the runtime's counters are copied in at scrape."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from promptserve.errors import Cancelled
from promptserve.server.requests import Dropped, Refused, Unmeetable

HISTORY_S = 600  # what a reloaded dashboard gets back: the last 10 minutes at one sample a second


# attribute -> (series, help, labels): every gauge the observer sets at scrape
GAUGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "queue": ("promptserve_queue_length", "Jobs waiting per level", ("level",)),
    "gpus": ("promptserve_workers_per_level", "Workers per level", ("level",)),
    "quality": (
        "promptserve_mean_predicted_quality",
        "Mean predicted quality of served images (percent)",
        (),
    ),
    "hit_ratio": (
        "promptserve_cache_hit_ratio",
        "Share of lookups served from a cached latent",
        (),
    ),
    "planner": ("promptserve_planner_ms_last", "Time of the last plan (ms)", ()),
    "retried": (
        "promptserve_requests_retried",
        "Requests put back in a queue because their worker was lost mid-batch",
        (),
    ),
    "workers_up": ("promptserve_workers_up", "Workers whose replica answers", ()),
    "jobs_restored": (
        "promptserve_jobs_restored",
        "Unfinished jobs a restart ran again from the job store",
        (),
    ),
    "submitted": (
        "promptserve_requests_submitted",
        "Images asked for (offered load); each ends in one outcome of promptserve_requests",
        (),
    ),
    "skipped": (
        "promptserve_cache_skipped_writes",
        "Cache entries not kept because writing their latents failed (a full disk)",
        (),
    ),
    "cache_bytes": (
        "promptserve_cache_bytes",
        "Bytes the cached latent files take on disk (linked levels counted once)",
        (),
    ),
    "cache_quota": (
        "promptserve_cache_quota_bytes",
        "The latent cache's byte quota (--cache-max-bytes)",
        (),
    ),
    "cache_entries": ("promptserve_cache_entries", "Entries in the approximate cache", ()),
    "evictions": (
        "promptserve_cache_evictions",
        "Cache entries evicted (LCBFU) to keep within the quota",
        (),
    ),
    "evicted_bytes": (
        "promptserve_cache_evicted_bytes",
        "Bytes of latent files removed by eviction",
        (),
    ),
    "embed_rows": (
        "promptserve_embedding_cache_rows",
        "Prompts in the embedding cache (bounded by --embed-cache-max-rows)",
        (),
    ),
    "cache_failures": (
        "promptserve_cache_update_failures",
        "Served answers whose cache insert or manifest commit failed (logged; answer sent)",
        (),
    ),
    "write_groups": (
        "promptserve_cache_write_groups",
        "Trips of the cache thread that wrote answered runs' entries, each one manifest"
        " transaction (entries written over this: how many each commit carries)",
        (),
    ),
    "stage_seconds": (
        "promptserve_stage_seconds_total",
        "Seconds spent in each stage of the request path (embed, lookup, intake, queue, run,"
        " cache_write), summed over the requests timed",
        ("stage",),
    ),
    "stage_requests": (
        "promptserve_stage_requests",
        "Requests timed in each stage of the request path",
        ("stage",),
    ),
    "loop_errors": (
        "promptserve_loop_errors",
        "Scheduler, re-plan or planner iterations that raised (logged; the loop went on)",
        (),
    ),
    "reintervals": (
        "promptserve_reintervals",
        "Running members moved to a longer feature-cache interval at a burst (step-level)",
        (),
    ),
    "webhooks": (
        "promptserve_webhooks",
        "Jobs' webhook attempts since start: delivered, retried (a failed attempt to try "
        "again) and failed (given up on after the last attempt)",
        ("outcome",),
    ),
    "background": (
        "promptserve_background",
        "Background work (priority batch): members running now (running), jobs waiting or "
        "paused in the lane (waiting), members written down at a boundary for interactive "
        "work (paused) and members that went on from there (resumed), both summed",
        ("state",),
    ),
    "batch_timeouts": (
        "promptserve_batch_timeouts",
        "Batches given up on after 10x their predicted latency (their requests failed)",
        (),
    ),
    "running_by_size": (
        "promptserve_running_by_size",
        "Requests running now (in a batch or a GPU's running batch), by size",
        ("size",),
    ),
    "adapter_residency": (
        "promptserve_adapter_residency",
        "LoRA adapters loaded into a device row (load), calls that found theirs resident (hit) "
        "and adapters pushed out (eviction), summed over the in-process workers",
        ("event",),
    ),
    "selector_chosen": (
        "promptserve_selector_chosen",
        "+select: 1 for the rule serving now, 0 for each other candidate",
        ("candidate",),
    ),
    "selector_score": (
        "promptserve_selector_replayed_quality",
        "+select: each candidate's effective quality in the last selection's replay (percent)",
        ("candidate",),
    ),
    "selector_events": (
        "promptserve_selector_selections",
        "+select: selections made, switches of rule, and selections skipped (budget: the "
        "replays used their CPU share; busy: the last was still running)",
        ("event",),
    ),
    "selector_cpu": (
        "promptserve_selector_cpu_seconds",
        "+select: thread CPU seconds the replays took, all together",
        (),
    ),
    "inflight": (
        "promptserve_inflight",
        "Requests in a GPU's running batch (step-level serving)",
        ("gpu",),
    ),
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "promptserve_requests",
            "Images requested, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "promptserve_latency_seconds",
            "End-to-end latency of served images",
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 21, 30, 60, 120),
        )
        self.levels = Counter(
            "promptserve_images_by_level",
            "Answered images by the approximation level K they ran at (the K mix)",
            ["level"],
            registry=self.registry,
        )
        self.sizes = Counter(
            "promptserve_images_by_size",
            "Answered images by the size (WIDTHxHEIGHT) they were made at",
            ["size"],
            registry=self.registry,
        )
        self.intervals = Counter(
            "promptserve_images_by_interval",
            "Answered images by the feature-cache interval they ran at (1: every step full)",
            ["interval"],
            registry=self.registry,
        )
        self.kinds = Counter(
            "promptserve_images_by_kind",
            "Answered images by kind: generation, edit (image-to-image) or inpaint",
            ["kind"],
            registry=self.registry,
        )
        for attr, (series, text, labels) in GAUGES.items():
            setattr(self, attr, Gauge(series, text, list(labels), registry=self.registry))
        self._q_sum = 0.0
        self._q_n = 0

    def count(
        self, outcome: object, deadline_s: float, latency_s: float, size: str | None = None
    ) -> None:
        """One image's end: served, late, refused, dropped, cancelled or failed (an answered
        one counted under its ``size`` too)."""
        if isinstance(outcome, BaseException):
            label = "failed"
            for kind, name in (
                (Refused, "refused"),
                (Unmeetable, "refused"),
                (Dropped, "dropped"),
                (Cancelled, "cancelled"),
            ):
                if isinstance(outcome, kind):
                    label = name
            self.requests.labels(label).inc()
            return
        late = outcome.queue_s + outcome.compute_s > deadline_s  # type: ignore[attr-defined]
        edit = getattr(outcome, "edit", None)
        kind = "generation" if edit is None else "edit" if edit.mask is None else "inpaint"
        self.kinds.labels(kind).inc()
        # an edit's start is its own image's, not a level: the K mix counts generations only
        level = outcome.level if edit is None else None  # type: ignore[attr-defined]
        self.observe_served(outcome.quality, latency_s, late, level)  # type: ignore[attr-defined]
        if size is not None:
            self.sizes.labels(size).inc()
        self.intervals.labels(str(getattr(outcome, "interval", 1))).inc()

    def observe_served(
        self, quality: float, latency_s: float, late: bool, level: int | None
    ) -> None:
        self.requests.labels("late" if late else "served").inc()
        if level is not None:
            self.levels.labels(str(level)).inc()
        self.latency.observe(latency_s)
        self._q_sum += quality
        self._q_n += 1
        self.quality.set(self._q_sum / self._q_n)


class History:
    """The last minutes of ``/metrics``, one scrape a second, so a reloaded dashboard keeps its
    charts. Only value lines are kept (no help text, no histogram buckets): about 1 KB each."""

    def __init__(self, keep: int = HISTORY_S) -> None:
        self.samples: deque[tuple[float, str]] = deque(maxlen=keep)

    def record(self, t_ms: float, exposition: bytes) -> None:
        lines = [
            line
            for line in exposition.decode().splitlines()
            if line and not line.startswith("#") and "_bucket{" not in line
        ]
        self.samples.append((t_ms, "\n".join(lines)))

    def since(self, t_ms: float) -> list[dict]:
        return [{"t": t, "metrics": text} for t, text in self.samples if t > t_ms]


def exposition(metrics: Metrics) -> bytes:
    return generate_latest(metrics.registry)
