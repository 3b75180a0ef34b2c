"""Policies over a range of loads and seeds: the comparison users and reviewers run.

Each point (rate, seed) is one ``compare`` run: the same requests for every policy, bounded by
the offline oracle. ``sweep.json`` keeps every point whole; the summary averages over seeds
(for an arrival shape with its own rate, all seeds together, at their mean measured rate).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from promptserve.cache.thresholds import Thresholds
from promptserve.errors import InputError
from promptserve.policy import Policy
from promptserve.policy.policies import LEAD, is_fair_rival
from promptserve.profile import Profile
from promptserve.quality import PenaltyShape
from promptserve.sim.compare import CompareConfig, compare, sim_inputs
from promptserve.sim.oracle import DEFAULT_WINDOW_S
from promptserve.sim.simulator import SimInputs
from promptserve.workload import generate_arrivals, make_requests, parse_arrival_spec
from promptserve.workload.batch import BatchMix, with_batch
from promptserve.workload.edits import EditMix, with_edits
from promptserve.workload.looks import LookMix, sized_profile, with_looks
from promptserve.workload.splits import Split, prompt_order

LEAD_COLOUR = "#111111"  # near-black, solid: no default-cycle colour; the oracle is dashed


@dataclass(frozen=True)
class SweepConfig:
    arrivals: str
    rates: tuple[float | None, ...]  # queries/minute; (None,): the spec's own rate (argus, rates:)
    seeds: tuple[int, ...]
    gpus: int
    slo_s: float
    penalty: PenaltyShape
    minutes: float | None = None
    time_scale: float = 1.0
    oracle_window_s: float = DEFAULT_WINDOW_S
    coarse_window_s: float | None = None  # also bound each point at this slot (the old 10 s)
    looks: LookMix = LookMix()  # sizes and adapters per request (``workload.looks``)
    edits: EditMix | None = None  # a share of edits (``workload.edits``)
    split: Split = "all"  # which half of the prompts and trace (``workload.splits``)
    batch: BatchMix | None = None  # a background stream beside them (``workload.batch``)


def parse_rates(text: str) -> tuple[float, ...]:
    """``"20,40,60"`` -> (20.0, 40.0, 60.0) queries/minute, each > 0."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InputError(f"--rates {text!r} is not a comma-separated list of numbers") from None
    if not values or any(not v > 0 for v in values):
        raise InputError(f"--rates {text!r} needs at least one rate, each > 0 queries/minute")
    return values


def point_inputs(
    prompts: Sequence[str],
    prompt_embeddings: np.ndarray,
    profile: Profile,
    thresholds: Thresholds,
    config: SweepConfig,
    rate: float | None,
    seed: int,
) -> tuple[SimInputs, CompareConfig]:
    """One sweep point's workload, as every policy (and ``sim.hindsight``) runs on it."""
    times = generate_arrivals(
        parse_arrival_spec(config.arrivals),
        rate_qpm=rate,
        minutes=config.minutes,
        time_scale=config.time_scale,
        seed=seed,
        split=config.split,
    )
    if len(times) == 0:
        raise InputError(f"the arrival spec produced no requests at rate {rate}")
    order = prompt_order(len(prompts), config.split, seed)
    chosen = [prompts[i] for i in order]
    requests = with_looks(make_requests(chosen, times, config.slo_s), config.looks, seed)
    requests = with_edits(requests, config.edits, seed)
    requests = with_batch(requests, config.batch, chosen, seed)
    row = {p: i for i, p in enumerate(chosen)}
    emb = prompt_embeddings[order][[row[r.prompt] for r in requests]]
    cmp = CompareConfig(
        config.gpus,
        config.slo_s,
        config.penalty,
        seed,
        0,
        config.oracle_window_s,
        config.coarse_window_s,
    )
    return sim_inputs(requests, emb, sized_profile(profile, config.looks), thresholds, cmp), cmp


def run_sweep(
    policies: Sequence[Policy],
    prompts: Sequence[str],
    prompt_embeddings: np.ndarray,
    profile: Profile,
    thresholds: Thresholds,
    config: SweepConfig,
    on_point: Callable[[dict], None] | None = None,
) -> dict:
    """Every (rate, seed) point; ``prompt_embeddings`` has one row per prompt, in file order."""
    points = []
    for rate in config.rates:
        for seed in config.seeds:
            inputs, cmp = point_inputs(
                prompts, prompt_embeddings, profile, thresholds, config, rate, seed
            )
            requests, times = inputs.requests, np.array([r.arrival_s for r in inputs.requests])
            rows, oracle, _, _ = compare(policies, inputs, cmp)
            span_min = max(float(times[-1] - times[0]) / 60.0, 1e-9)
            point = {
                "rate_qpm": rate,  # None: the arrival shape's own rate
                "measured_qpm": round(len(times) / span_min, 2),
                "seed": seed,
                "requests": len(requests),
                "policies": rows,
                "oracle": oracle,
            }
            points.append(point)
            if on_point is not None:
                on_point(point)
    return {"config": asdict(config), "points": points}


def summarise(result: dict) -> list[dict]:
    """Per rate: each policy's effective quality and violation ratio (mean, min, max over seeds),
    the oracle's, and the best fair rival of ``promptserve-step`` (``policies.is_fair_rival``:
    every other policy with the same queue and admission)."""
    by_rate: dict[float | None, list[dict]] = {}
    for point in result["points"]:
        by_rate.setdefault(point["rate_qpm"], []).append(point)
    rows = []
    for rate, points in by_rate.items():
        measured = round(float(np.mean([p["measured_qpm"] for p in points])), 2)
        row: dict = {
            "rate_qpm": rate if rate is not None else measured,
            "seeds": len(points),
            "policies": {},
        }
        for name in points[0]["policies"]:
            eq = [p["policies"][name]["effective_quality"] for p in points]
            vr = [p["policies"][name]["slo_violation_ratio"] for p in points]
            mq = [p["policies"][name]["mean_quality"] for p in points]
            row["policies"][name] = {
                "effective_quality": _stats(eq),
                "slo_violation_ratio": _stats(vr, 4),
                "mean_quality": _stats(mq),
            }
        row["oracle"] = {
            "effective_quality": _stats(
                [p["oracle"]["effective_quality_upper_bound"] for p in points]
            ),
            "slo_violation_ratio": _stats(
                [p["oracle"]["slo_violation_ratio_lower_bound"] for p in points], 4
            ),
        }
        if "coarse" in points[0]["oracle"]:
            row["oracle"]["coarse_effective_quality"] = _stats(
                [p["oracle"]["coarse"]["effective_quality_upper_bound"] for p in points]
            )
        fair = {
            n: v["effective_quality"]["mean"]
            for n, v in row["policies"].items()
            if is_fair_rival(n)
        }
        if fair:
            best = max(fair, key=lambda n: fair[n])
            row["best_fair_baseline"] = {"policy": best, "effective_quality": fair[best]}
        rows.append(row)
    return rows


def _stats(values: list[float], digits: int = 2) -> dict:
    if any(v is None for v in values):  # no bound (edits: ``compare.NO_BOUND_WITH_EDITS``)
        return {"mean": None, "min": None, "max": None}
    return {
        "mean": round(float(np.mean(values)), digits),
        "min": round(float(np.min(values)), digits),
        "max": round(float(np.max(values)), digits),
    }


def write_sweep(out: Path, result: dict) -> list[dict]:
    """``sweep.json`` (every point), ``sweep.md``, ``sweep.png`` and ``sweep.html``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    (out / "sweep.json").write_text(json.dumps(result | {"summary": summary}, indent=2) + "\n")
    table = markdown_table(summary)
    (out / "sweep.md").write_text(
        "# Sweep\n\n```\n" + json.dumps(result["config"]) + "\n```\n\n" + table
    )
    png = plot_sweep(summary, result["config"])
    (out / "sweep.png").write_bytes(png)
    (out / "sweep.html").write_text(html_page(result["config"], table, png), encoding="utf-8")
    return summary


def markdown_table(summary: list[dict]) -> str:
    """Effective quality (mean over seeds) per policy and rate, the best fair rival of
    ``promptserve-step`` and the oracle bound; violation ratios in brackets."""
    names = list(summary[0]["policies"]) if summary else []
    head = "| qpm | " + " | ".join(names) + " | best fair rival | oracle bound |"
    lines = [head, "|---" * (len(names) + 3) + "|"]
    for row in summary:
        cells = [
            f"{row['policies'][n]['effective_quality']['mean']:.1f} "
            f"({row['policies'][n]['slo_violation_ratio']['mean']:.3f})"
            for n in names
        ]
        best = row.get("best_fair_baseline")
        best_cell = f"{best['policy']} {best['effective_quality']:.1f}" if best else "—"
        bound = row["oracle"]["effective_quality"]["mean"]
        bound = "—" if bound is None else bound
        lines.append(
            f"| {row['rate_qpm']:g} | " + " | ".join(cells) + f" | {best_cell} | {bound} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(summary: list[dict], config: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rates = [row["rate_qpm"] for row in summary]
    names = list(summary[0]["policies"]) if summary else []
    panels = (
        ("effective_quality", "effective quality (%)"),
        ("slo_violation_ratio", "SLO violations"),
    )
    for ax, (metric, label) in zip(axes, panels):
        for name in names:
            stats = [row["policies"][name][metric] for row in summary]
            mean = [s["mean"] for s in stats]
            # the recommended policy leads: thick, in a colour no other line takes, on top
            style = {"lw": 3.0, "color": LEAD_COLOUR, "zorder": 5} if name == LEAD else {"lw": 1.2}
            (line,) = ax.plot(rates, mean, marker="o", label=name, **style)
            ax.fill_between(
                rates,
                [s["min"] for s in stats],
                [s["max"] for s in stats],
                color=line.get_color(),
                alpha=0.15,
            )
        bound = [row["oracle"][metric]["mean"] for row in summary]
        if None not in bound:
            ax.plot(rates, bound, "k--", lw=1.5, label="oracle bound")
        ax.set_xlabel("offered load (queries/minute)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{config['arrivals']}, {config['gpus']} GPUs, SLO {config['slo_s']} s, "
        f"{config['penalty']} penalty, seeds {list(config['seeds'])} (shaded: min-max)"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def html_page(config: dict, table_md: str, png: bytes) -> str:
    """One self-contained page: the plot inlined, the table, the configuration."""
    rows = [r.strip("|").split("|") for r in table_md.strip().splitlines()]
    head, body = rows[0], rows[2:]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body
    )
    img = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>promptserve sweep</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        "<h1>Policies against load</h1>"
        f"<p><code>{html.escape(json.dumps(config))}</code></p>"
        f"<img alt='effective quality and violations against load' "
        f"src='data:image/png;base64,{img}'>"
        "<p>Effective quality, mean over seeds (violation ratio in brackets).</p>"
        f"<table><tr>{cells}</tr>{trs}</table></body></html>\n"
    )
