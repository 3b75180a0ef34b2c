"""Similarity thresholds: which level K a prompt tolerates given its nearest neighbour's similarity.

Thresholds belong to an embedder: the published ones are CLIP-text similarities, and other
embedders spread similarity differently, so each ships its own table with its provenance
(``promptserve/thresholds/*.json``). ``refit_from_pairs`` maps a reference table onto another
embedder from logged (prompt, neighbour, reference similarity) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.optimize import isotonic_regression

from promptserve.errors import InputError

MISS_K = 0
REFERENCE_STEPS = 50  # the published thresholds' schedule (SDXL, 50 steps)


def engine_level(k_reference: int, levels: Sequence[int], total_steps: int) -> int:
    """The largest of ``levels`` (K of ``total_steps``) that skips no larger a fraction of the
    schedule than ``k_reference`` of 50."""
    fraction = k_reference / REFERENCE_STEPS
    return max((k for k in levels if k / total_steps <= fraction + 1e-9), default=0)


@dataclass(frozen=True)
class Thresholds:
    embedder: str
    levels: tuple[int, ...]  # K values, descending
    min_similarity: tuple[float, ...]  # the cosine similarity each K needs, descending
    provenance: str = ""

    def k_opt(self, similarity: float | None) -> int:
        """The largest K whose threshold ``similarity`` meets; 0 (a miss) when none or no neighbour."""
        if similarity is None:
            return MISS_K
        for k, s in zip(self.levels, self.min_similarity, strict=True):
            if similarity >= s:
                return k
        return MISS_K

    def k_opt_many(self, similarity: np.ndarray) -> np.ndarray:
        """Vectorised ``k_opt``; NaN similarity (no neighbour) is a miss. Compared in float64, as
        ``k_opt`` does: NumPy would round a threshold to a float32 array's precision."""
        similarity = np.asarray(similarity, dtype=np.float64)
        out = np.full(similarity.shape, MISS_K, dtype=np.int64)
        for k, s in zip(reversed(self.levels), reversed(self.min_similarity), strict=True):
            out[similarity >= s] = k
        return out

    def on_levels(self, levels: Sequence[int], total_steps: int) -> Thresholds:
        """The table on an engine's own levels (K of ``total_steps``): a reference level K_ref (of
        ``REFERENCE_STEPS``) becomes the engine's largest level skipping no larger a fraction of
        the schedule, ``k / total_steps <= K_ref / 50``; where several reference levels land on
        one engine level, the lowest similarity (the smallest K_ref) is kept. The reference
        profile's own levels map onto themselves."""
        rows: dict[int, float] = {}
        for k_ref, sim in zip(self.levels, self.min_similarity, strict=True):
            k = engine_level(k_ref, levels, total_steps)
            if k > 0:
                rows[k] = min(sim, rows.get(k, sim))
        ordered = sorted(rows.items(), key=lambda kv: -kv[0])
        return Thresholds(
            self.embedder,
            tuple(k for k, _ in ordered),
            tuple(v for _, v in ordered),
            self.provenance,
        )

    def to_json(self) -> dict:
        return {
            "embedder": self.embedder,
            "levels": [
                {"K": k, "min_similarity": round(s, 4)}
                for k, s in zip(self.levels, self.min_similarity, strict=True)
            ],
            "provenance": self.provenance,
        }


def thresholds_from_json(data: dict, source: str) -> Thresholds:
    try:
        rows = sorted(data["levels"], key=lambda r: -int(r["K"]))
        levels = tuple(int(r["K"]) for r in rows)
        sims = tuple(float(r["min_similarity"]) for r in rows)
        embedder = str(data["embedder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"thresholds {source}: missing or bad field ({exc})") from None
    if any(b > a for a, b in zip(sims, sims[1:])):
        raise InputError(f"thresholds {source}: min_similarity must not rise as K falls")
    if any(k <= 0 for k in levels):
        raise InputError(f"thresholds {source}: every K must be > 0 (K = 0 is the miss level)")
    return Thresholds(embedder, levels, sims, str(data.get("provenance", "")))


def shipped_thresholds(embedder: str) -> Thresholds:
    """The table shipped for ``embedder`` (``minilm`` or ``clip``)."""
    ref = resources.files("promptserve") / "thresholds" / f"{embedder}.json"
    if not ref.is_file():
        raise InputError(f"no shipped thresholds for embedder {embedder!r} (have: minilm, clip)")
    return thresholds_from_json(json.loads(ref.read_text()), f"{embedder}.json")


def embedder_thresholds(embedder: str) -> Thresholds:
    """The shipped table an embedder's similarities are read with: ``minilm`` has its own
    (mapped from CLIP on logged pairs); any other embedder (the pipeline's CLIP, ``hashing`` in
    tests) uses the published CLIP table."""
    return shipped_thresholds("minilm" if embedder == "minilm" else "clip")


def load_thresholds(path_or_name: str) -> Thresholds:
    """A shipped table by embedder name, or a JSON file in the same format."""
    path = Path(path_or_name)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError(f"thresholds file {path_or_name!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"thresholds file {path_or_name!r} is not valid JSON ({exc})"
            ) from None
        return thresholds_from_json(data, repr(path_or_name))
    return shipped_thresholds(path_or_name)


def refit_from_pairs(
    embedder_similarity: np.ndarray,
    reference_similarity: np.ndarray,
    reference: Thresholds,
    embedder: str,
) -> Thresholds:
    """Translate ``reference`` thresholds onto another embedder's similarity scale.

    A monotone (isotonic) map from the embedder's similarity to the reference similarity is
    fitted over the pairs; each reference threshold becomes the smallest embedder similarity
    whose fitted reference similarity meets it. A threshold beyond the fitted range (the pairs
    never reach it) comes from a least-squares line through the pairs instead.
    """
    x = np.asarray(embedder_similarity, dtype=np.float64)
    y = np.asarray(reference_similarity, dtype=np.float64)
    if len(x) < 10:
        raise InputError(f"refit needs at least 10 pairs, got {len(x)}")
    order = np.argsort(x)
    x, y = x[order], y[order]
    fitted = isotonic_regression(y).x
    slope, intercept = np.polyfit(y, x, 1)
    out, notes = [], []
    for k, r in zip(reference.levels, reference.min_similarity, strict=True):
        reached = np.nonzero(fitted >= r)[0]
        if len(reached) and fitted[0] < r:
            out.append(float(x[reached[0]]))
        else:
            out.append(float(slope * r + intercept))
            notes.append(f"K={k} extrapolated")
    out = list(np.minimum.accumulate(out))  # keep thresholds non-increasing as K falls
    provenance = (
        f"refit from {len(x)} pairs onto {reference.embedder} thresholds by isotonic regression"
        + (f" ({', '.join(notes)} by a straight line)" if notes else "")
    )
    return Thresholds(embedder, reference.levels, tuple(out), provenance)


def kopt_mix(k_opts: Sequence[int], levels: Sequence[int]) -> dict[int, float]:
    """Share of prompts at each K_opt (0 = miss), over ``levels``."""
    counts = np.bincount(np.searchsorted(sorted(levels), k_opts), minlength=len(levels))
    total = max(len(k_opts), 1)
    return {k: float(c) / total for k, c in zip(sorted(levels), counts, strict=True)}


def read_pairs(path: Path) -> tuple[list[str], list[str], list[float]]:
    """(prompt, neighbour, reference_similarity) rows of a CSV or TSV file."""
    import csv

    if not path.is_file():
        raise InputError(f"pairs file {str(path)!r} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        need = ("prompt", "neighbour", "reference_similarity")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"pairs file {str(path)!r} lacks column(s) {', '.join(missing)}")
        left, right, sims = [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                sim = float(row["reference_similarity"])
            except (TypeError, ValueError):
                raise InputError(
                    f"{path}:{line}: reference_similarity {row['reference_similarity']!r} is not a number"
                ) from None
            if not -1.0 <= sim <= 1.0:
                raise InputError(f"{path}:{line}: reference_similarity {sim} is outside [-1, 1]")
            left.append(row["prompt"] or "")
            right.append(row["neighbour"] or "")
            sims.append(sim)
    return left, right, sims
