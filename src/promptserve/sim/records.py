"""What a run records per request, and the figures computed from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from promptserve.policy.types import Status


@dataclass
class Records:
    """Columns, one row per request (index = request id)."""

    arrival_s: np.ndarray
    deadline_s: np.ndarray
    k_opt: np.ndarray
    status: np.ndarray  # Status values; QUEUED means the run lost it (a bug)
    finish_s: np.ndarray  # NaN unless served
    level: np.ndarray  # -1 unless served
    quality: np.ndarray  # percent; 0 unless served
    gpu: np.ndarray  # the GPU that served it; -1 unless served
    interval: np.ndarray | None = None  # its feature-cache interval (1: every step full)
    edit: np.ndarray | None = None  # an edit (from its own image: never a cache hit)
    batch: np.ndarray | None = None  # background work (``priority: batch``)

    @classmethod
    def empty(cls, arrival_s: np.ndarray, deadline_s: np.ndarray) -> Records:
        n = len(arrival_s)
        return cls(
            arrival_s,
            deadline_s,
            np.zeros(n, int),
            np.full(n, int(Status.QUEUED)),
            np.full(n, np.nan),
            np.full(n, -1),
            np.zeros(n),
            np.full(n, -1),
            np.ones(n, int),
            np.zeros(n, bool),
            np.zeros(n, bool),
        )

    def subset(self, mask: np.ndarray) -> Records:
        """The rows ``mask`` keeps, as records of their own."""
        cols = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Records(*(None if col is None else col[mask] for col in cols))

    def hit(self) -> np.ndarray:
        """Per request: started from a cached latent (an edit's start is its own image)."""
        hit = self.level > 0
        return hit & ~self.edit if self.edit is not None else hit

    def summary(self, planner_ms: list[float]) -> dict:
        """The run's figures; with background work, those of the interactive requests and,
        under ``background``, the background jobs' own."""
        if self.batch is None or not self.batch.any():
            return self._summary(planner_ms)
        out = self.subset(~self.batch)._summary(planner_ms)
        out["background"] = self.background()
        return out

    def background(self) -> dict:
        """The background jobs: how many, how they ended, and when the last finished."""
        assert self.batch is not None
        status, finish = self.status[self.batch], self.finish_s[self.batch]
        served = status == Status.SERVED
        return {
            "jobs": int(self.batch.sum()),
            "served": int(served.sum()),
            "served_late": int((served & (finish > self.deadline_s[self.batch] + 1e-9)).sum()),
            "refused": int((status == Status.REFUSED).sum()),
            "dropped": int((status == Status.DROPPED).sum()),
            "mean_quality": round(float(self.quality[self.batch][served].mean()), 3)
            if served.any()
            else 0.0,
            "last_finish_s": round(float(np.nanmax(finish)), 3) if served.any() else None,
        }

    def _summary(self, planner_ms: list[float]) -> dict:
        n = len(self.arrival_s)
        served = self.status == Status.SERVED
        in_slo = served & (self.finish_s <= self.deadline_s + 1e-9)
        latency = (self.finish_s - self.arrival_s)[served]
        minutes = max(float(self.arrival_s.max() - self.arrival_s.min()) / 60.0, 1e-9) if n else 1.0
        return {
            "requests": n,
            "served_in_slo": int(in_slo.sum()),
            "served_late": int((served & ~in_slo).sum()),
            "refused": int((self.status == Status.REFUSED).sum()),
            "dropped": int((self.status == Status.DROPPED).sum()),
            "lost": int((self.status < Status.SERVED).sum()),
            "effective_quality": round(float(self.quality[in_slo].sum() / n), 3) if n else 0.0,
            "mean_quality": round(float(self.quality[served].mean()), 3) if served.any() else 0.0,
            "slo_violation_ratio": round(float(1 - in_slo.sum() / n), 4) if n else 0.0,
            "goodput_qpm": round(float(in_slo.sum() / minutes), 2),
            "p50_latency_s": round(float(np.percentile(latency, 50)), 3) if len(latency) else None,
            "p99_latency_s": round(float(np.percentile(latency, 99)), 3) if len(latency) else None,
            "planner_ms_p50": round(float(np.median(planner_ms)), 3) if planner_ms else 0.0,
        }

    def per_minute(self) -> dict[str, list[float]]:
        """Offered load, goodput, effective and mean quality, cache hit ratio (share of answers
        started from a cached latent) and violations per minute of arrival."""
        minute = (self.arrival_s // 60).astype(int)
        m = int(minute.max()) + 1 if len(minute) else 0
        served = self.status == Status.SERVED
        in_slo = served & (self.finish_s <= self.deadline_s + 1e-9)
        offered = np.bincount(minute, minlength=m)
        good = np.bincount(minute, weights=in_slo, minlength=m)
        q_sum = np.bincount(minute, weights=np.where(served, self.quality, 0), minlength=m)
        n_served = np.bincount(minute, weights=served, minlength=m)
        q_good = np.bincount(minute, weights=np.where(in_slo, self.quality, 0), minlength=m)
        hits = np.bincount(minute, weights=served & self.hit(), minlength=m)
        return {
            "effective_quality": (q_good / np.maximum(offered, 1)).tolist(),
            "hit_ratio": np.where(n_served > 0, hits / np.maximum(n_served, 1), np.nan).tolist(),
            "offered_qpm": offered.tolist(),
            "goodput_qpm": good.tolist(),
            "mean_quality": np.where(
                n_served > 0, q_sum / np.maximum(n_served, 1), np.nan
            ).tolist(),
            "violations": (offered - good).tolist(),
        }
