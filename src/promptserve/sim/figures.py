"""The figures the docs quote, rendered from the JSON files the benchmarks write.

A doc holds a figure block as ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->``; its text
is exactly what ``render(NAME, root)`` makes of the block's file under ``docs/figures/``. The
benchmark that writes a file rewrites its blocks (``--docs``), and ``tests/test_doc_figures.py``
fails when a block and its file disagree, so a doc cannot quote a number no command made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from promptserve.policy.policies import LEAD

FIGURES = Path("docs/figures")
BLOCK = re.compile(r"<!-- figures:([\w.-]+) -->\n(.*?)<!-- /figures:\1 -->", re.S)
TIE = 0.1  # points of effective quality within which two policies are tied
SWEEP_NAMES = {"poisson-2gpu": "Poisson", "conversation-2gpu": "conversation trace"}


def _cell(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.1f} ({lo:.1f}–{hi:.1f})"


def _verdict(margin: float) -> str:
    return "tie" if abs(margin) <= TIE else ("win" if margin > 0 else "loss")


def headline(data: dict, split: str = "held-out") -> str:
    """The README's table: ``promptserve-step`` against the best fair rival at each point of
    one split, feature caching off and on, with the bound and the spread over seeds."""
    seeds = ", ".join(str(s) for s in data["seeds"])
    lines = [
        f"{split} split, 2 GPUs, SLO {data['slo_s']:g} s, {data['penalty']} penalty, seeds "
        f"{seeds} (mean, min–max over seeds; violation ratio of the mean run in brackets)",
        "",
        "| feature caching | load | promptserve-step | best fair rival | margin | oracle bound |",
        "|---|---|---|---|---|---|",
    ]
    for fc, sweeps in data["results"][split].items():
        for sweep, rows in sweeps.items():
            for row in rows:
                ours = row["effective_quality"][LEAD]
                rival = row["best_rival"]
                best = row["effective_quality"][rival]
                lines.append(
                    f"| {fc} | {SWEEP_NAMES.get(sweep, sweep)} {row['rate_qpm']:g} qpm "
                    f"| {_cell(ours['mean'], ours['min'], ours['max'])} "
                    f"({row['violation_ratio'][LEAD]:.3f}) "
                    f"| {_cell(best['mean'], best['min'], best['max'])} "
                    f"({row['violation_ratio'][rival]:.3f}) `{rival}` "
                    f"| {row['margin']:+.2f} | {row['oracle']:.1f} |"
                )
    totals = data["totals"][split]
    lines.append("")
    lines.append(
        "Against the best fair rival at each point (a tie is within "
        f"{TIE:g} points): "
        + "; ".join(
            f"feature caching {fc}: {t['wins']} wins, {t['ties']} ties, {t['losses']} losses"
            for fc, t in totals.items()
        )
        + ". The oracle column is an upper bound with feature caching off and on alike (cached"
        " steps at their own cost, `sim/oracle.py`); no policy beat it at any seed "
        f"({data['oracle_breaches']} breaches)."
    )
    return "\n".join(lines) + "\n"


def headline_compact(data: dict, split: str = "held-out") -> str:
    """The README's table: per load, ``promptserve-step`` against the best fair rival with
    feature caching off and on, and the bound (the spread over seeds is in ``headline``)."""
    seeds = ", ".join(str(s) for s in data["seeds"])
    lines = [
        f"{split} split, 2 GPUs, SLO {data['slo_s']:g} s, {data['penalty']} penalty, mean of "
        f"seeds {seeds}: effective quality, {LEAD} / best fair rival (margin), oracle bound",
        "",
        "| load | feature caching off | bound | feature caching on | bound |",
        "|---|---|---|---|---|",
    ]
    panels = data["results"][split]
    for sweep, rows in panels["off"].items():
        for i, row in enumerate(rows):
            cells = []
            for fc in ("off", "on"):
                r = panels[fc][sweep][i]
                ours = r["effective_quality"][LEAD]["mean"]
                best = r["effective_quality"][r["best_rival"]]["mean"]
                cells.append(
                    f"{ours:.1f} / {best:.1f} `{r['best_rival']}` ({r['margin']:+.2f}) "
                    f"| {r['oracle']:.1f}"
                )
            lines.append(
                f"| {SWEEP_NAMES.get(sweep, sweep)} {row['rate_qpm']:g} qpm | "
                + " | ".join(cells)
                + " |"
            )
    totals = data["totals"][split]
    lines += [
        "",
        "Wins, ties (within "
        f"{TIE:g} points) and losses: "
        + "; ".join(f"feature caching {fc} {t['wins']} / {t['ties']} / {t['losses']}"
                    for fc, t in totals.items())
        + ". The bound holds with feature caching off and on; no policy beat it "
        f"({data['oracle_breaches']} breaches).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_headline(data: dict, split: str = "held-out") -> bytes:
    """``promptserve-step`` and the best fair rival per point (mean, min–max over seeds) beside
    the bound, one panel per feature-cache setting (``docs/figures/policies.png``)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = data["results"][split]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (fc, sweeps) in zip(axes[0], panels.items()):
        rows = [(sweep, row) for sweep, rs in sweeps.items() for row in rs]
        x = list(range(len(rows)))
        labels = [f"{'P' if s.startswith('poisson') else 'T'}{r['rate_qpm']:g}" for s, r in rows]
        for name, colour, key in (
            (LEAD, "#111111", lambda r: LEAD),
            ("best fair rival", "#d62728", lambda r: r["best_rival"]),
        ):
            stats = [r["effective_quality"][key(r)] for _, r in rows]
            mean = [st["mean"] for st in stats]
            err = [[m - st["min"] for m, st in zip(mean, stats)],
                   [st["max"] - m for m, st in zip(mean, stats)]]  # fmt: skip
            ax.errorbar(x, mean, yerr=err, fmt="o-", color=colour, capsize=3, label=name)
        ax.plot(x, [r["oracle"] for _, r in rows], "k--", lw=1, label="oracle bound")
        ax.set_xticks(x, labels)
        ax.set_xlabel("load (P: Poisson, T: conversation trace; queries/minute)")
        ax.set_ylabel("effective quality (%)")
        ax.set_title(f"feature caching {fc}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{split} split, 2 GPUs, seeds {data['seeds']} (bars: min–max over seeds)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def full_tables(data: dict, split: str) -> str:
    """Every policy at every point of one split (``docs/comparison.md``)."""
    out = []
    for fc, sweeps in data["results"][split].items():
        names = data["policies"][fc]
        for sweep, rows in sweeps.items():
            out += [
                f"**{split}, {SWEEP_NAMES.get(sweep, sweep)}, feature caching {fc}** "
                f"(effective quality, mean of seeds {', '.join(map(str, data['seeds']))}; "
                "bold: the best)",
                "",
                "| qpm | " + " | ".join(names) + " | best fair rival | oracle bound |",
                "|---" * (len(names) + 3) + "|",
            ]
            for row in rows:
                eq = {n: row["effective_quality"][n]["mean"] for n in names}
                top = max(eq.values())
                cells = [f"**{v:.1f}**" if v == top else f"{v:.1f}" for v in eq.values()]
                out.append(
                    f"| {row['rate_qpm']:g} | "
                    + " | ".join(cells)
                    + f" | `{row['best_rival']}` ({_verdict(row['margin'])} "
                    f"{row['margin']:+.2f}) | {row['oracle']:.1f} |"
                )
            out.append("")
    return "\n".join(out)


def cached_shares(_: dict) -> str:
    """Each family's cached-step share with its source, and the step capacity it gives at the
    longest intervals: r / (1 + (r - 1) c) full steps' worth per full step's time."""
    from promptserve.cachedstep import CACHED_STEP_SHARES

    lines = [
        "| family | cached step / full step (c) | capacity at r = 2 / 3 / 4 | source |",
        "|---|---|---|---|",
    ]
    for s in CACHED_STEP_SHARES.values():
        gains = " / ".join(f"{r / (1 + (r - 1) * s.share):.2f}x" for r in (2, 3, 4))
        lines.append(f"| {s.family} | {s.share:.3f} | {gains} | {s.source} |")
    return "\n".join(lines) + "\n"


def interval_losses(_: dict) -> str:
    """Each penalty preset's quality kept per feature-cache interval (``quality.q_r``)."""
    from promptserve.quality import interval_quality

    head = "| preset | " + " | ".join(f"r = {r}" for r in range(1, 7)) + " |"
    lines = [head, "|---" * 7 + "|"]
    for shape in ("mild", "steep"):
        q = interval_quality(shape)  # type: ignore[arg-type]
        lines.append(f"| {shape} | " + " | ".join(f"{q.q_r(r):.2f}" for r in range(1, 7)) + " |")
    return "\n".join(lines) + "\n"


def few_step_savings(data: dict) -> str:
    """``bench_fewstep.py``: per schedule, the share of a run no level skips and what each
    level saved end to end, against K/N."""
    names = {"sd_50": "SD 1.x", "zimage_8": "Z-Image-Turbo", "flux_schnell_4": "FLUX.1-schnell"}
    lines = [
        "| schedule | work no level skips | saved at each level (ideal K/N) |",
        "|---|---|---|",
    ]
    for key in ("sd_50", "zimage_8", "flux_schnell_4"):
        run = data[key]
        saved = ", ".join(
            f"K{k[1:]} {v:.2f} ({run['ideal'][k]:.2f})" for k, v in run["saved"].items()
        )
        lines.append(
            f"| {run['steps']} steps ({names[key]}) | {run['fixed_share']:.2f} | {saved} |"
        )
    return "\n".join(lines) + "\n"


def background_lane(data: dict) -> str:
    """``bench_batch.py``: per point, the interactive effective quality alone and its change
    beside the background stream, and what the stream got of what they left, for each lane."""
    lines = [
        "| feature caching | qpm | alone | lane | with the stream | violations | GPU-time left"
        " | of it used | step slots left | of them used | images per GPU-hour |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in data["points"]:
        for lane in ("apart", "beside"):
            row = p[lane]
            slots = (
                "— | —"
                if row["slots_used"] is None
                else f"{row['slots_left']:.1%} | {row['slots_used']:.2f}"
            )
            lines.append(
                f"| {p['feature_cache']} | {p['rate_qpm']:g} | {p['alone']:.2f} | {lane} | "
                f"{row['effective_quality']:.2f} ({row['change']:+.2f}) | {row['violations']:.3f}"
                f" | {row['left_share']:.1%} | {row['left_used']:.2f} | {slots} | "
                f"{row['images_per_gpu_hour']:.1f} |"
            )
    return "\n".join(lines) + "\n"


HINDSIGHT_POINTS = {
    "poisson-80": "Poisson 80",
    "poisson-100": "Poisson 100",
    "conv-100": "conversation trace 100",
    "conv-120": "conversation trace 120",
}


def hindsight_bracket(data: dict) -> str:
    """``bench_hindsight.py``: per point, the online policy between the hindsight reference (a
    level per request chosen knowing the whole trace) and the bound, beside the better rival."""
    lines = [
        f"{data['split']} split, {data['penalty']} penalty, feature caching "
        f"{data['feature_cache']}, means of seeds "
        f"{', '.join(str(r) for r in sorted({r['seed'] for r in data['runs']}))}, "
        f"{data['budget']} simulations a search",
        "",
        "| point (qpm) | online | hindsight | oracle bound | rival | online − rival "
        "| hindsight − rival |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in data["points"].items():
        lines.append(
            f"| {HINDSIGHT_POINTS.get(name, name)} | {m['online']:.2f} | {m['hindsight']:.2f} "
            f"| {m['oracle']:.2f} | {m['rival']:.2f} `{m['rival_name']}` "
            f"| {m['online'] - m['rival']:+.2f} "
            f"| {m['hindsight_minus_rival']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def hindsight_file(split: str, penalty: str, feature_cache: str) -> str:
    return f"hindsight-{split}-{penalty}-{feature_cache}.json"


# a block's file under docs/figures ("": rendered from the code's own constants)
RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "cached-shares": ("", cached_shares),
    "interval-losses": ("", interval_losses),
    "headline": ("policies.json", headline),
    "headline-compact": ("policies.json", headline_compact),
    "policies-held-out": ("policies.json", lambda d: full_tables(d, "held-out")),
    "policies-tune": ("policies.json", lambda d: full_tables(d, "tune")),
    "headline-tune": ("policies.json", lambda d: headline(d, "tune")),
    "headline-mild": ("policies-mild.json", headline),
    "policies-mild-held-out": ("policies-mild.json", lambda d: full_tables(d, "held-out")),
    "few-step": ("fewstep.json", few_step_savings),
    "background": ("batch.json", background_lane),
    **{
        f"hindsight-held-out-{pen}-{fc}": (hindsight_file("held-out", pen, fc), hindsight_bracket)
        for pen, fc in (("steep", "off"), ("mild", "off"), ("steep", "on"))
    },
}


def render(name: str, root: Path) -> str:
    """Block ``name`` as its file under ``root/docs/figures`` gives it."""
    if name not in RENDERERS:
        raise KeyError(f"no figure block named {name!r} (known: {', '.join(RENDERERS)})")
    file, make = RENDERERS[name]
    return make(json.loads((root / FIGURES / file).read_text()) if file else {})


def blocks(text: str) -> dict[str, str]:
    """Every figure block of a doc: name -> its text."""
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def rewrite(path: Path, root: Path) -> list[str]:
    """Rewrite every block of the doc at ``path`` whose file exists; the names rewritten."""
    text = path.read_text(encoding="utf-8")
    done: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name not in RENDERERS:
            return m.group(0)
        file = RENDERERS[name][0]
        if file and not (root / FIGURES / file).exists():
            return m.group(0)
        done.append(name)
        return f"<!-- figures:{name} -->\n{render(name, root)}<!-- /figures:{name} -->"

    path.write_text(BLOCK.sub(fill, text), encoding="utf-8")
    return done


def stale(path: Path, root: Path) -> list[str]:
    """The blocks of a doc that differ from what their files give."""
    return [n for n, body in blocks(path.read_text(encoding="utf-8")).items()
            if body != render(n, root)]  # fmt: skip
