"""Arrival processes, all deterministic by seed, all returning sorted arrival times in seconds.

One spec grammar serves every command: ``poisson``, ``argus``, ``trace:PATH`` (a CSV with a
``TIMESTAMP`` column in the Azure format) and ``rates:PATH`` (a CSV of ``minute,qpm``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from promptserve.errors import InputError
from promptserve.workload.splits import Split, arrival_seed, phase, trace_window

ArrivalKind = Literal["poisson", "argus", "trace", "rates"]

# The published workload (Argus artifact plots): 8 GPUs, 840 minutes, a base of about
# 50 qpm and three bursts of about 390 qpm lasting about 150 minutes each. The base
# stretches are laid out evenly around the bursts.
ARGUS_SEGMENTS: tuple[tuple[float, float], ...] = (
    (90, 50.0),
    (150, 390.0),
    (105, 50.0),
    (150, 390.0),
    (105, 50.0),
    (150, 390.0),
    (90, 50.0),
)
ARGUS_GPUS = 8


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: ArrivalKind
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class RateSegment:
    start_min: float
    end_min: float
    qpm: float


def parse_arrival_spec(text: str) -> ArrivalSpec:
    """Parse ``poisson | argus | trace:PATH | rates:PATH``; the file must exist."""
    text = text.strip()
    if text in ("poisson", "argus"):
        return ArrivalSpec(text)  # type: ignore[arg-type]
    kind, sep, rest = text.partition(":")
    if sep and kind in ("trace", "rates"):
        path = Path(rest)
        if not rest:
            raise InputError(f"arrival spec {text!r}: {kind}: needs a file path")
        if not path.is_file():
            raise InputError(f"arrival spec {text!r}: file {rest!r} does not exist")
        return ArrivalSpec(kind, path)  # type: ignore[arg-type]
    raise InputError(f"arrival spec {text!r} is not one of: poisson, argus, trace:PATH, rates:PATH")


def poisson_arrivals(rate_qpm: float, minutes: float, seed: int) -> np.ndarray:
    """A homogeneous Poisson process at ``rate_qpm`` queries/minute for ``minutes``."""
    return piecewise_arrivals([RateSegment(0.0, minutes, rate_qpm)], seed)


def piecewise_arrivals(segments: list[RateSegment], seed: int) -> np.ndarray:
    """A Poisson process whose rate is constant on each segment (queries/minute)."""
    rng = np.random.default_rng(seed)
    parts = []
    for seg in segments:
        duration_s = (seg.end_min - seg.start_min) * 60.0
        if seg.qpm <= 0 or duration_s <= 0:
            continue
        count = rng.poisson(seg.qpm * duration_s / 60.0)
        parts.append(seg.start_min * 60.0 + np.sort(rng.uniform(0.0, duration_s, count)))
    return np.concatenate(parts) if parts else np.empty(0)


def argus_segments(time_scale: float = 1.0) -> list[RateSegment]:
    """The Argus shape; ``time_scale`` > 1 compresses its minutes, keeping its rates."""
    segments, start = [], 0.0
    for minutes, qpm in ARGUS_SEGMENTS:
        end = start + minutes / time_scale
        segments.append(RateSegment(start, end, qpm))
        start = end
    return segments


def read_rates(path: Path) -> list[RateSegment]:
    """A ``minute,qpm`` CSV: the rate from each listed minute until the next one.

    The last row closes the schedule: its rate holds for one minute.
    """
    rows = _read_csv(path, ("minute", "qpm"))
    points: list[tuple[float, float]] = []
    for line, row in rows:
        minute = _number(path, line, "minute", row["minute"])
        qpm = _number(path, line, "qpm", row["qpm"])
        if minute < 0 or qpm < 0:
            raise InputError(f"{path}:{line}: minute and qpm must be >= 0")
        if points and minute <= points[-1][0]:
            raise InputError(
                f"{path}:{line}: minutes must increase ({minute} after {points[-1][0]})"
            )
        points.append((minute, qpm))
    if not points:
        raise InputError(f"rates file {str(path)!r} has no rows")
    ends = [m for m, _ in points[1:]] + [points[-1][0] + 1.0]
    return [RateSegment(m, e, q) for (m, q), e in zip(points, ends, strict=True)]


def read_trace_offsets(path: Path) -> np.ndarray:
    """Seconds since the first arrival of an Azure-format trace, sorted."""
    rows = _read_csv(path, ("TIMESTAMP",))
    stamps = []
    for line, row in rows:
        try:
            stamps.append(_parse_timestamp(row["TIMESTAMP"]))
        except ValueError:
            raise InputError(
                f"{path}:{line}: TIMESTAMP {row['TIMESTAMP']!r} is not a date-time"
            ) from None
    if len(stamps) < 2:
        raise InputError(f"trace {str(path)!r} needs at least two timestamps")
    t = np.sort(np.array([s.timestamp() for s in stamps]))
    return t - t[0]


def trace_arrivals(
    offsets_s: np.ndarray, rate_qpm: float | None, minutes: float | None, phase: float = 0.0
) -> np.ndarray:
    """Replay a trace, stretched in time so that its mean rate is ``rate_qpm``.

    Stretching keeps the burst shape (peak over mean, burst lengths relative to the whole).
    The replay starts ``phase`` (0 <= phase < 1) of the way through the trace and loops, so
    that a run shorter than the stretched trace sees a different window per phase
    (``workload.splits.phase`` turns a seed into one).
    """
    span_s = float(offsets_s[-1])
    if span_s <= 0:
        raise InputError("trace spans zero seconds")
    if not 0.0 <= phase < 1.0:
        raise InputError(f"trace phase must be in [0, 1), got {phase}")
    own_qpm = len(offsets_s) / (span_s / 60.0)
    stretch = 1.0 if rate_qpm is None else own_qpm / rate_qpm
    scaled = offsets_s * stretch
    period_s = span_s * stretch * len(offsets_s) / max(len(offsets_s) - 1, 1)
    if phase > 0.0:  # rotate: the arrivals from the phase on, then the wrapped head
        cut = int(phase * len(scaled))
        start = scaled[cut]
        scaled = np.concatenate([scaled[cut:] - start, scaled[:cut] + (period_s - start)])
    if minutes is None:
        return scaled
    horizon_s = minutes * 60.0
    loops = int(np.ceil(horizon_s / period_s))
    out = np.concatenate([scaled + i * period_s for i in range(max(loops, 1))])
    return out[out < horizon_s]


def generate_arrivals(
    spec: ArrivalSpec,
    *,
    rate_qpm: float | None = None,
    minutes: float | None = None,
    time_scale: float = 1.0,
    seed: int = 0,
    split: Split = "all",
) -> np.ndarray:
    """Arrival times in seconds for a parsed spec; see the module docstring for the flags.

    A seed draws a Poisson or rate-shaped process; on a trace it picks the replay's start
    (``splits.phase``). ``split`` keeps a trace to its half and moves a held-out Poisson seed
    off the tune split's (``workload.splits``)."""
    if rate_qpm is not None and rate_qpm <= 0:
        raise InputError(f"--rate must be > 0 queries/minute, got {rate_qpm}")
    if minutes is not None and minutes <= 0:
        raise InputError(f"--minutes must be > 0, got {minutes}")
    if time_scale <= 0:
        raise InputError(f"--time-scale must be > 0, got {time_scale}")
    if spec.kind == "poisson":
        if rate_qpm is None:
            raise InputError("arrivals 'poisson' need --rate QPM")
        minutes = minutes if minutes is not None else 10.0
        return poisson_arrivals(rate_qpm, minutes, arrival_seed(split, seed))
    if spec.kind == "trace":
        assert spec.path is not None
        offsets = trace_window(read_trace_offsets(spec.path), split)
        return trace_arrivals(offsets, rate_qpm, minutes, phase(seed))
    if rate_qpm is not None:
        raise InputError(f"--rate applies to poisson and trace:, not to {spec.kind}")
    if spec.kind == "argus":
        segments = argus_segments(time_scale)
    else:
        assert spec.path is not None
        segments = [
            RateSegment(s.start_min / time_scale, s.end_min / time_scale, s.qpm)
            for s in read_rates(spec.path)
        ]
    if minutes is not None:
        segments = _clip(segments, minutes)
    return piecewise_arrivals(segments, arrival_seed(split, seed))


def _clip(segments: list[RateSegment], minutes: float) -> list[RateSegment]:
    return [
        RateSegment(s.start_min, min(s.end_min, minutes), s.qpm)
        for s in segments
        if s.start_min < minutes
    ]


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    f"{str(path)!r} lacks column(s) {', '.join(missing)} "
                    f"(found: {', '.join(reader.fieldnames or []) or 'none'})"
                )
            return [(i + 2, row) for i, row in enumerate(reader)]
    except UnicodeDecodeError:
        raise InputError(f"{str(path)!r} is not UTF-8 text") from None


def _number(path: Path, line: int, column: str, value: str | None) -> float:
    try:
        number = float(value or "")
    except ValueError:
        raise InputError(f"{path}:{line}: {column} {value!r} is not a number") from None
    if not np.isfinite(number):
        raise InputError(f"{path}:{line}: {column} {value!r} is not finite")
    return number


def _parse_timestamp(text: str | None) -> datetime:
    text = (text or "").strip()
    head, dot, frac = text.partition(".")
    # Azure writes 7 fractional digits; datetime takes at most 6.
    return datetime.fromisoformat(head + (dot + frac[:6] if dot else "")).replace(tzinfo=UTC)
