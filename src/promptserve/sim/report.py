"""Tables, JSON, Markdown and the timeline plot of a simulated comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLUMNS = (
    "effective_quality",
    "mean_quality",
    "slo_violation_ratio",
    "served_in_slo",
    "served_late",
    "refused",
    "dropped",
    "goodput_qpm",
    "p50_latency_s",
    "p99_latency_s",
    "planner_ms_p50",
)


GLOSSARY = (
    (
        "effective quality",
        "mean quality over every request, a request not answered in time "
        "counting 0: the figure to compare",
    ),
    ("mean quality", "mean predicted quality (percent of full generation) of the answered ones"),
    ("SLO violations", "late + refused + dropped, as a share of requests"),
    ("refused", "turned away at arrival (HTTP 429): no level could finish it in time"),
    ("dropped", "accepted, then given up when it could no longer finish in time (HTTP 503)"),
    ("late", "answered after its deadline"),
    (
        "oracle bound",
        "an LP that knows the whole trace: no schedule can have a higher effective "
        "quality or a lower violation ratio",
    ),
    ("argus", "the published planner and router, as shipped"),
    ("clipper-ha / clipper-ht", "every GPU at K = 0 / at the fastest level"),
    ("nirvana", "each request at its own K_opt, any idle GPU takes the most urgent batch"),
    ("proteus", "accuracy scaling blind to the prompt; a level change reloads the model"),
    ("promptserve", "the joint MILP of levels and routing under the SLO, re-planned every 5 s"),
    (
        "promptserve-step",
        "step-level serving: requests join a GPU's running batch between "
        "steps, each at the K a price on step-slots picks",
    ),
    ("continuous-ha / continuous-ht", "step-level batching at K = 0 / at the fastest level"),
    (
        "+shed / +admit / +fast",
        "promptserve's deadline-aware queue / refusal at arrival / 5 s "
        "re-planning, given to any policy",
    ),
)


def run_line(config: dict) -> str:
    """The run's settings as one readable line (no raw JSON)."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in config.items() if v is not None)


def write_report(
    out: Path,
    config: dict,
    policies: dict[str, dict],
    oracle: dict,
    timelines: dict[str, dict],
    html: bool = False,
    title: str = "Simulated comparison",
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": config, "policies": policies, "oracle": oracle}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, title))
    plot_timeline(out / "timeline.png", timelines, config.get("slo_s"))
    if html:
        (out / "report.html").write_text(html_report(report, timelines), encoding="utf-8")
    return report


def html_report(report: dict, timelines: dict[str, dict]) -> str:
    """One self-contained page: the charts' code and the run's data inlined (NaN: no answer)."""
    from promptserve.web import page

    extra = {"timelines": timelines, "run_line": run_line(report["config"]), "glossary": GLOSSARY}
    data = json.dumps(report | extra).replace("</", "<\\/")
    return page("report.html").replace("/*DATA*/", data)


def markdown(report: dict, title: str = "Simulated comparison") -> str:
    lines = [f"# {title}", "", f"Run: {run_line(report['config'])}.", ""]
    lines.append("| policy | " + " | ".join(COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in report["policies"].items():
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    for name, row in report["policies"].items():
        if "background" in row:
            bg = row["background"]
            lines += [
                "",
                f"{name}, background stream (the figures above are the interactive requests'): "
                f"{bg['served']} of {bg['jobs']} jobs served ({bg['served_late']} late, "
                f"{bg['dropped']} expired, {bg['refused']} refused), mean quality "
                f"{bg['mean_quality']}, the last at {bg['last_finish_s']} s.",
            ]
        if "selector" in row:
            sel = row["selector"]
            shares = ", ".join(f"{n} {s:.0%}" for n, s in sel["chosen_share"].items())
            lines += [
                "",
                f"{name}: {sel['selections']} selections, {sel['switches']} switches; serving "
                f"by {shares} of them; its replays took {sel['cpu_s']} s of CPU.",
            ]
    o = report["oracle"]
    if o.get("effective_quality_upper_bound") is None:
        lines += [
            "",
            o.get(
                "note",
                "No oracle line: a live run has no offline bound (run `promptserve simulate` "
                "on the same arrivals for one).",
            ),
            "",
        ]
        return "\n".join(lines + glossary_lines())
    lines += [
        "",
        f"Oracle (offline LP bound, {o.get('window_s')} s slots): effective quality <= "
        f"{o['effective_quality_upper_bound']}, "
        f"SLO-violation ratio >= {o['slo_violation_ratio_lower_bound']}.",
        "",
    ]
    return "\n".join(lines + glossary_lines())


def glossary_lines() -> list[str]:
    return ["## Glossary", "", *(f"- **{term}**: {meaning}." for term, meaning in GLOSSARY), ""]


def plot_timeline(path: Path, timelines: dict[str, dict], slo_s: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    first = next(iter(timelines.values()), None)
    if first is not None:
        axes[0].plot(first["offered_qpm"], color="black", lw=1.5, label="offered")
    for name, tl in timelines.items():
        x = np.arange(len(tl["goodput_qpm"]))
        axes[0].plot(x, tl["goodput_qpm"], lw=1, label=name)
        axes[1].plot(x, tl["mean_quality"], lw=1, label=name)
        axes[2].plot(x, tl["violations"], lw=1, label=name)
        axes[3].plot(x, np.cumsum(tl["violations"]), lw=1, label=name)
    axes[0].set_ylabel("queries/minute\n(offered, goodput)")
    axes[1].set_ylabel("mean quality of\nanswered (%)")
    axes[2].set_ylabel("SLO violations\nper minute")
    axes[3].set_ylabel("cumulative\nviolations")
    axes[3].set_xlabel("minute of arrival")
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title(f"policies side by side (SLO {slo_s} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
