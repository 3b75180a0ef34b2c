"""The ``promptserve`` command. Commands translate flags into calls; they decide nothing."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from promptserve.errors import InputError

app = typer.Typer(help="Prompt-aware text-to-image serving.", no_args_is_help=True)
workload_app = typer.Typer(
    help="Inspect workloads: arrivals and prompt mixes.", no_args_is_help=True
)
thresholds_app = typer.Typer(help="Similarity -> K thresholds per embedder.", no_args_is_help=True)
app.add_typer(workload_app, name="workload")
app.add_typer(thresholds_app, name="thresholds")

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Bad input ends the command with one line naming the problem and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def embed_with_progress(embedder_name: str, prompts: list[str], cache_dir: Path) -> np.ndarray:
    from promptserve.cache.embed import make_embedder

    embedder = make_embedder(embedder_name, cache_dir)
    chunks = [prompts[i : i + 256] for i in range(0, len(prompts), 256)]
    with progress() as bar:
        task = bar.add_task(f"embedding ({embedder_name})", total=len(prompts))
        out = []
        for chunk in chunks:
            out.append(embedder.embed(chunk))
            bar.advance(task, len(chunk))
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


PromptsOpt = Annotated[
    Path,
    typer.Option(
        "--prompts", help="Prompt file: .txt one a line, or .tsv/.csv with a Prompt column."
    ),
]
ArrivalsOpt = Annotated[
    str, typer.Option("--arrivals", help="poisson | argus | trace:PATH | rates:PATH")
]
RateOpt = Annotated[
    float | None, typer.Option("--rate", help="Mean rate (queries/minute) of poisson and trace:.")
]
MinutesOpt = Annotated[
    float | None, typer.Option("--minutes", help="Length of the workload in minutes.")
]
TimeScaleOpt = Annotated[
    float, typer.Option("--time-scale", help="Compress argus/rates: timelines by this factor.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
EmbedderOpt = Annotated[str, typer.Option(help="minilm (real) or hashing (tests only).")]
ModelOpt = Annotated[str, typer.Option(help="tiny (built in) or a diffusers folder / hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or mps.")]
ThresholdsOpt = Annotated[str, typer.Option(help="Shipped table name or a thresholds JSON file.")]
CacheDirOpt = Annotated[
    Path, typer.Option("--cache-dir", help="Folder for on-disk caches (embeddings).")
]


@workload_app.command("inspect")
@user_errors
def workload_inspect(
    prompts: PromptsOpt,
    arrivals: ArrivalsOpt = "poisson",
    rate: RateOpt = None,
    minutes: MinutesOpt = None,
    time_scale: TimeScaleOpt = 1.0,
    seed: SeedOpt = 0,
    embedder: EmbedderOpt = "minilm",
    thresholds: ThresholdsOpt = "",
    cache_dir: CacheDirOpt = Path(".promptserve"),
    out: Annotated[Path, typer.Option(help="Where to write the PNG plot.")] = Path("workload.png"),
) -> None:
    """Print the arrival rate over time and the K_opt mix of a workload; write a PNG plot."""
    from promptserve.cache.index import CacheIndex
    from promptserve.cache.replay import replay
    from promptserve.cache.thresholds import embedder_thresholds, kopt_mix, load_thresholds
    from promptserve.quality import PUBLISHED_KOPT_MIX
    from promptserve.workload import generate_arrivals, load_prompts, parse_arrival_spec
    from promptserve.workload.inspect import plot_workload, rate_per_minute

    spec = parse_arrival_spec(arrivals)
    table = load_thresholds(thresholds) if thresholds else embedder_thresholds(embedder)
    texts = load_prompts(prompts)
    times = generate_arrivals(
        spec, rate_qpm=rate, minutes=minutes, time_scale=time_scale, seed=seed
    )
    qpm = rate_per_minute(times)
    used = [texts[i % len(texts)] for i in range(len(times))] if len(times) else texts
    unique_needed = list(dict.fromkeys(used))
    vecs = embed_with_progress(embedder, unique_needed, cache_dir)
    row_of = {p: i for i, p in enumerate(unique_needed)}
    embeddings = vecs[[row_of[p] for p in used]]
    index = CacheIndex(dim=embeddings.shape[1])
    with progress() as bar:
        task = bar.add_task("replaying through the cache", total=len(used))
        result = replay(used, embeddings, table, index, on_step=lambda _i: bar.advance(task))
    mix = kopt_mix(result.k_opt.tolist(), (0, *table.levels))

    summary = Table(title=f"arrivals: {arrivals} ({len(times)} requests)")
    for col in ("minutes", "mean qpm", "p50 qpm", "max qpm", "max / mean"):
        summary.add_column(col, justify="right")
    mean = float(qpm.mean()) if len(qpm) else 0.0
    summary.add_row(
        f"{len(qpm)}",
        f"{mean:.1f}",
        f"{np.median(qpm) if len(qpm) else 0:.1f}",
        f"{qpm.max() if len(qpm) else 0:.0f}",
        f"{(qpm.max() / mean) if mean else 0:.2f}",
    )
    console.print(summary)
    mix_table = Table(
        title=f"optimal K mix ({embedder} embeddings, {table.embedder} thresholds, online cache)"
    )
    mix_table.add_column("K_opt")
    mix_table.add_column("this workload", justify="right")
    mix_table.add_column("published", justify="right")
    for k in sorted(mix, reverse=True):
        label = "miss (0)" if k == 0 else str(k)
        mix_table.add_row(
            label, f"{100 * mix[k]:.1f}%", f"{100 * PUBLISHED_KOPT_MIX.get(k, 0):.1f}%"
        )
    console.print(mix_table)
    plot_workload(out, qpm, mix, PUBLISHED_KOPT_MIX, f"{arrivals}: {len(times)} requests")
    console.print(f"plot written to {out}")


@thresholds_app.command("show")
@user_errors
def thresholds_show(
    name: Annotated[
        str, typer.Argument(help="minilm, clip, or a thresholds JSON file.")
    ] = "minilm",
) -> None:
    """Print a thresholds table and where its numbers come from."""
    from promptserve.cache.thresholds import load_thresholds

    table = load_thresholds(name)
    out = Table(title=f"thresholds for {table.embedder}")
    out.add_column("K", justify="right")
    out.add_column("min similarity", justify="right")
    for k, s in zip(table.levels, table.min_similarity, strict=True):
        out.add_row(str(k), f"{s:.3f}")
    console.print(out)
    console.print(table.provenance, highlight=False)


@thresholds_app.command("refit")
@user_errors
def thresholds_refit(
    pairs: Annotated[
        Path, typer.Option(help="CSV/TSV with columns prompt, neighbour, reference_similarity.")
    ],
    embedder: Annotated[
        str, typer.Option(help="Embedder to fit thresholds for: minilm or hashing.")
    ] = "minilm",
    reference: Annotated[
        str, typer.Option(help="Thresholds the reference similarity belongs to.")
    ] = "clip",
    cache_dir: CacheDirOpt = Path(".promptserve"),
    out: Annotated[Path, typer.Option(help="Where to write the fitted thresholds JSON.")] = Path(
        "thresholds.json"
    ),
) -> None:
    """Translate reference thresholds onto another embedder from logged neighbour pairs."""
    from promptserve.cache.thresholds import load_thresholds, read_pairs, refit_from_pairs

    ref = load_thresholds(reference)
    left, right, ref_sim = read_pairs(pairs)
    vecs = embed_with_progress(embedder, left + right, cache_dir)
    a, b = vecs[: len(left)], vecs[len(left) :]
    fitted = refit_from_pairs(np.sum(a * b, axis=1), np.asarray(ref_sim), ref, embedder)
    out.write_text(json.dumps(fitted.to_json(), indent=2) + "\n")
    thresholds_show(str(out))
    console.print(f"written to {out}")


def main() -> None:  # pragma: no cover - console entry point
    app()


PoliciesOpt = Annotated[
    str,
    typer.Option(
        help="Comma-separated policies, each NAME[+shed][+admit][+fast] "
        "(NAME: clipper-ha, clipper-ht, nirvana, proteus, argus, promptserve)."
    ),
]
ProfileOpt = Annotated[
    Path | None,
    typer.Option(help="Profile JSON (measured or reference format); default: the SDXL reference."),
]
SloOpt = Annotated[
    float | None,
    typer.Option(
        "--slo", help="Latency SLO in seconds; default 5x the profile's full-quality latency."
    ),
]
PenaltyOpt = Annotated[str, typer.Option(help="Penalty shape above K_opt: mild or steep.")]

# The fair comparison: the published method as shipped, and every rival with promptserve's queue
# and admission (a baseline without them collapses under load; beating it proves nothing).
FAIR_POLICIES = (
    "argus,argus+shed+admit+fast,clipper-ha+shed+admit,clipper-ht+shed+admit,"
    "nirvana+shed+admit,promptserve"
)


@app.command("simulate")
@user_errors
def simulate_cmd(
    policies: PoliciesOpt = FAIR_POLICIES,
    prompts: PromptsOpt = Path("data/diffusiondb_prompts_4k.txt"),
    arrivals: ArrivalsOpt = "argus",
    rate: RateOpt = None,
    minutes: MinutesOpt = None,
    time_scale: TimeScaleOpt = 1.0,
    gpus: Annotated[int, typer.Option(help="Number of GPUs (workers).", min=1, max=4096)] = 8,
    profile: ProfileOpt = None,
    slo: SloOpt = None,
    quality_penalty: PenaltyOpt = "mild",
    embedder: EmbedderOpt = "minilm",
    warm: Annotated[
        int,
        typer.Option(help="Prompts from the top of the file to pre-load into the cache.", min=0),
    ] = 0,
    seed: SeedOpt = 0,
    cache_dir: CacheDirOpt = Path(".promptserve"),
    out: Annotated[
        Path, typer.Option(help="Folder for report.json, report.md and timeline.png.")
    ] = Path("out/simulate"),
    html: Annotated[
        bool,
        typer.Option(
            "--html/--no-html",
            help="Also write report.html: the charts, policies side by side, the oracle bound.",
        ),
    ] = False,
) -> None:
    """Run policies side by side on one workload and bound them with the offline oracle."""
    from promptserve.cache.thresholds import embedder_thresholds
    from promptserve.policy import parse_policies
    from promptserve.sim.compare import CompareConfig, compare, config_dict
    from promptserve.sim.report import COLUMNS, write_report
    from promptserve.workload import (
        generate_arrivals,
        load_prompts,
        make_requests,
        parse_arrival_spec,
    )

    chosen = parse_policies(policies)
    prof, slo_s = _profile_slo_penalty(profile, slo, quality_penalty)
    spec = parse_arrival_spec(arrivals)
    texts = load_prompts(prompts)
    times = generate_arrivals(
        spec, rate_qpm=rate, minutes=minutes, time_scale=time_scale, seed=seed
    )
    if len(times) == 0:
        raise InputError("the arrival spec produced no requests")
    requests = make_requests(texts, times, slo_s)
    distinct = list(dict.fromkeys([r.prompt for r in requests] + texts[:warm]))
    vecs = embed_with_progress(embedder, distinct, cache_dir)
    row = {p: i for i, p in enumerate(distinct)}
    embeddings = vecs[[row[r.prompt] for r in requests]]
    warm_pair = (texts[:warm], vecs[[row[p] for p in texts[:warm]]]) if warm else None
    thresholds = embedder_thresholds(embedder)
    config = CompareConfig(gpus, slo_s, quality_penalty, seed, warm)  # type: ignore[arg-type]
    with progress() as bar:
        tasks = {p.name: bar.add_task(f"simulating {p.name}", total=len(requests)) for p in chosen}
        rows, oracle, timelines, _ = compare(
            chosen,
            requests,
            embeddings,
            prof,
            thresholds,
            config,
            warm_pair,
            on_progress=lambda name, n: bar.advance(tasks[name], n),
        )
    extra = {
        "prompts": str(prompts),
        "arrivals": arrivals,
        "rate_qpm": rate,
        "minutes": minutes,
        "time_scale": time_scale,
        "profile": prof.name,
        "embedder": embedder,
        "requests": len(requests),
    }
    write_report(out, config_dict(config, **extra), rows, oracle, timelines, html=html)
    table = Table(
        title=f"{len(requests)} requests, {gpus} GPUs, SLO {slo_s} s, penalty {quality_penalty}"
    )
    table.add_column("policy")
    shown = COLUMNS[:8]
    for col in shown:
        table.add_column(col.replace("_", " "), justify="right")
    for name, r in rows.items():
        table.add_row(name, *(str(r[c]) for c in shown))
    table.add_row(
        "oracle bound",
        str(oracle["effective_quality_upper_bound"]),
        "",
        str(oracle["slo_violation_ratio_lower_bound"]),
        *[""] * 5,
    )
    console.print(table)
    written = "report.json, report.md, timeline.png" + (", report.html" if html else "")
    console.print(f"report written to {out}/: {written}")


def _profile_slo_penalty(profile: Path | None, slo: float | None, penalty: str):
    """The profile (default: the SDXL reference) and the SLO (default: 5x its full-quality
    latency), the penalty shape checked."""
    from promptserve.profile import load_profile, reference_profile
    from promptserve.sim.compare import default_slo

    if penalty not in ("mild", "steep"):
        raise InputError(f"--quality-penalty {penalty!r} is not mild or steep")
    prof = load_profile(profile) if profile else reference_profile()
    slo_s = slo if slo is not None else default_slo(prof)
    if slo_s <= 0:
        raise InputError(f"--slo must be > 0 seconds, got {slo_s}")
    return prof, slo_s


@app.command("sweep")
@user_errors
def sweep_cmd(
    policies: PoliciesOpt = FAIR_POLICIES,
    prompts: PromptsOpt = Path("data/diffusiondb_prompts_4k.txt"),
    arrivals: ArrivalsOpt = "poisson",
    rates: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated mean rates (queries/minute) for poisson and trace:; "
            "leave out for argus and rates: (their own rate)."
        ),
    ] = None,
    gpus: Annotated[int, typer.Option(help="Number of GPUs (workers).", min=1, max=4096)] = 2,
    minutes: Annotated[
        float | None,
        typer.Option(
            "--minutes",
            help="Length of each run in minutes; default 20 for poisson and trace:, "
            "the whole shape for argus and rates:.",
        ),
    ] = None,
    time_scale: TimeScaleOpt = 1.0,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; one run each.")] = "1,2,3",
    profile: ProfileOpt = None,
    slo: SloOpt = None,
    quality_penalty: PenaltyOpt = "steep",
    oracle_window: Annotated[
        float, typer.Option(help="The oracle bound's time slot in seconds.", min=0.01)
    ] = 1.0,
    embedder: EmbedderOpt = "minilm",
    cache_dir: CacheDirOpt = Path(".promptserve"),
    out: Annotated[
        Path, typer.Option(help="Folder for sweep.json, sweep.md, sweep.png and sweep.html.")
    ] = Path("out/sweep"),
) -> None:
    """Run policies over a range of loads and seeds; plot effective quality and violations
    against load beside the oracle bound."""
    from promptserve.cache.thresholds import embedder_thresholds
    from promptserve.policy import parse_policies
    from promptserve.sim.sweep import SweepConfig, parse_rates, run_sweep, write_sweep
    from promptserve.workload import load_prompts, parse_arrival_spec

    chosen = parse_policies(policies)
    prof, slo_s = _profile_slo_penalty(profile, slo, quality_penalty)
    spec = parse_arrival_spec(arrivals)
    if rates is None and spec.kind == "poisson":
        raise InputError("arrivals 'poisson' need --rates (for example --rates 20,40,60)")
    rate_list: tuple[float | None, ...] = parse_rates(rates) if rates is not None else (None,)
    if minutes is None and spec.kind in ("poisson", "trace"):
        minutes = 20.0
    seed_list = tuple(_int_list(seeds, "--seeds"))
    texts = load_prompts(prompts)
    vecs = embed_with_progress(embedder, texts, cache_dir)
    thresholds = embedder_thresholds(embedder)
    config = SweepConfig(
        arrivals, rate_list, seed_list, gpus, slo_s, quality_penalty, minutes, time_scale,
        oracle_window,
    )  # fmt: skip
    with progress() as bar:
        task = bar.add_task("sweep points", total=len(rate_list) * len(seed_list))
        result = run_sweep(
            chosen, texts, vecs, prof, thresholds, config, lambda _p: bar.advance(task)
        )
    summary = write_sweep(out, result)
    table = Table(title=f"effective quality, mean over seeds {list(seed_list)} ({arrivals})")
    table.add_column("qpm", justify="right")
    for p in chosen:
        table.add_column(p.name, justify="right")
    table.add_column("oracle bound", justify="right")
    for row in summary:
        table.add_row(
            f"{row['rate_qpm']:g}",
            *(f"{row['policies'][p.name]['effective_quality']['mean']:.1f}" for p in chosen),
            f"{row['oracle']['effective_quality']['mean']:.1f}",
        )
    console.print(table)
    console.print(f"sweep written to {out}/: sweep.json, sweep.md, sweep.png, sweep.html")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise InputError(f"{flag} {text!r} needs at least one integer >= 0")
    return values


@app.command("profile")
@user_errors
def profile_cmd(
    model: ModelOpt = "tiny",
    levels: Annotated[str, typer.Option(help="Levels K to measure; default: the model's.")] = "",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to measure.")] = "1,2,4,8",
    repeats: Annotated[int, typer.Option(help="Timed runs per point.", min=1, max=100)] = 1,
    device: DeviceOpt = "cpu",
    out: Annotated[Path, typer.Option(help="Where to write the measured profile JSON.")] = Path(
        "profile.json"
    ),
) -> None:
    """Measure batch latency per level and batch size on this device; write a profile file."""
    from promptserve.engine import make_engine
    from promptserve.engine.profiling import measure

    sizes = sorted(set(_int_list(batch_sizes, "--batch-sizes")))
    if sizes[0] != 1:
        raise InputError("--batch-sizes must include 1")
    engine = make_engine(model, device=device)
    chosen = sorted(set(_int_list(levels, "--levels"))) if levels else list(engine.levels)
    bad = [k for k in chosen if k not in engine.levels]
    if bad or chosen[0] != 0:
        raise InputError(
            f"--levels must start at 0 and be among the model's levels {engine.levels}"
        )
    with progress() as bar:
        task = bar.add_task(f"profiling {model}", total=len(chosen) * len(sizes))
        measured = measure(
            engine, model, chosen, sizes, repeats, on_point=lambda *_: bar.advance(task)
        )
    out.write_text(measured.model_dump_json(indent=2) + "\n")
    table = Table(title=f"batch latency (s), {model} on {device}")
    table.add_column("K")
    for b in sizes:
        table.add_column(f"batch {b}", justify="right")
    for k, row in zip(chosen, measured.batch_latency_s, strict=True):
        table.add_row(str(k), *(f"{v:.3f}" for v in row))
    console.print(table)
    console.print(f"profile written to {out}")


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    prompts: PromptsOpt,
    model: ModelOpt = "tiny",
    scorer: Annotated[
        str, typer.Option(help="fidelity, or clip:FOLDER (CLIP weights in a local folder).")
    ] = "fidelity",
    pairs: Annotated[
        int,
        typer.Option(help="Neighbour pairs to measure, spread over similarity.", min=1, max=10_000),
    ] = 20,
    embedder: EmbedderOpt = "minilm",
    thresholds: ThresholdsOpt = "",
    device: DeviceOpt = "cpu",
    cache_dir: CacheDirOpt = Path(".promptserve"),
    out: Annotated[Path, typer.Option(help="Where to write the fitted constants (JSON).")] = Path(
        "quality_fit.json"
    ),
) -> None:
    """Measure q(s, K) on neighbour pairs and fit the quality model's constants."""
    from promptserve.cache.index import CacheIndex
    from promptserve.cache.replay import replay
    from promptserve.cache.thresholds import embedder_thresholds, load_thresholds
    from promptserve.engine import make_engine
    from promptserve.engine.calibrate import fit, measure_pairs
    from promptserve.engine.scoring import make_scorer
    from promptserve.workload import load_prompts

    judge = make_scorer(scorer)
    table = load_thresholds(thresholds) if thresholds else embedder_thresholds(embedder)
    texts = list(dict.fromkeys(load_prompts(prompts)))
    vecs = embed_with_progress(embedder, texts, cache_dir)
    index = CacheIndex(dim=vecs.shape[1])
    result = replay(texts, vecs, table, index)
    with_neighbour = [
        i for i in np.argsort(result.similarity) if not np.isnan(result.similarity[i])
    ]
    if not with_neighbour:
        raise InputError("the prompts file needs at least two prompts to form a pair")
    chosen = [
        with_neighbour[int(j)]
        for j in np.linspace(0, len(with_neighbour) - 1, min(pairs, len(with_neighbour)))
    ]
    triples = []
    for i in chosen:  # the neighbour the replay saw: the most similar earlier prompt
        j = int(np.argmax(vecs[: int(i)] @ vecs[i]))
        triples.append((texts[i], texts[j], float(result.similarity[i])))
    engine = make_engine(model, device=device)
    with progress() as bar:
        task = bar.add_task(f"calibrating ({judge.name})", total=len(triples))
        samples = measure_pairs(engine, judge, triples, table, on_pair=lambda: bar.advance(task))
    fitted = fit(samples, engine.levels)
    out.write_text(
        json.dumps({"model": model, "scorer": judge.name, **fitted.to_json()}, indent=2) + "\n"
    )
    view = Table(title=f"q(s, K) measured on {fitted.pairs} pairs ({judge.name}; {model})")
    view.add_column("K", justify="right")
    view.add_column("fitted Q[K]", justify="right")
    view.add_column("tolerated pairs: mean", justify="right")
    view.add_column("above K_opt: mean", justify="right")
    for k, q in zip(fitted.levels, fitted.level_quality, strict=True):
        ok = [s.quality for s in samples if s.k == k and s.k <= s.k_opt]
        bad = [s.quality for s in samples if s.k == k and s.k > s.k_opt]
        view.add_row(
            str(k),
            f"{q:.2f}",
            f"{np.mean(ok):.2f}" if ok else "-",
            f"{np.mean(bad):.2f}" if bad else "-",
        )
    console.print(view)
    console.print(
        f"per level above K_opt: {fitted.per_level:.3f} points; cap {fitted.cap:.2f}; written to {out}"
    )


@app.command("serve")
@user_errors
def serve_cmd(
    config: Annotated[
        Path | None, typer.Option(help="TOML file with any of these settings (flags win).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (default 8000).", min=1, max=65535)
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="tiny (built in) or a diffusers folder / hub id.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="tiny, diffusers or modeled; default from --model.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Engine workers (one per GPU; on the CPU, a number).", min=1, max=64),
    ] = None,
    slo: Annotated[
        float | None,
        typer.Option(
            "--slo",
            help="Default deadline in seconds; default 5x full-quality latency, at least 30.",
        ),
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="Policy driving admission, routing and batching.")
    ] = None,
    embedder: Annotated[
        str | None, typer.Option(help="minilm (real) or hashing (tests only).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or mps.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the cache and embeddings (default .promptserve)."),
    ] = None,
    api_keys: Annotated[
        Path | None, typer.Option(help="File of KEY:TENANT lines (also $PROMPTSERVE_API_KEYS).")
    ] = None,
    speedup: Annotated[
        float | None,
        typer.Option(
            help="Modelled backend only: run this many times faster than the profile.", min=0.001
        ),
    ] = None,
    expected_qpm: Annotated[
        float | None,
        typer.Option(help="Load (queries/min) the first plan is made for (default 1).", min=0),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--no-ray", help="Serve on Ray Serve: one worker replica per GPU (docs/ray.md)."
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="With --ray: the cluster to join (auto, ray://HOST:PORT); default local."
        ),
    ] = None,
    worker_cpus: Annotated[
        float | None,
        typer.Option(help="With --ray: CPUs per worker replica (default 1).", min=0.01),
    ] = None,
    worker_gpus: Annotated[
        float | None,
        typer.Option(
            help="With --ray: GPUs per worker replica (default 1 on CUDA, else 0).", min=0
        ),
    ] = None,
) -> None:
    """Serve the OpenAI Images API on the live policy core (default: tiny model on the CPU)."""
    import uvicorn

    from promptserve.config import ServeFile, load_serve_file, server_config
    from promptserve.server import build_app

    base = load_serve_file(config) if config else ServeFile()
    flags = {
        "host": host,
        "port": port,
        "model": model,
        "backend": backend,
        "workers": workers,
        "slo_s": slo,
        "policy": policy,
        "embedder": embedder,
        "device": device,
        "cache_dir": cache_dir,
        "api_keys_file": api_keys,
        "speedup": speedup,
        "expected_qpm": expected_qpm,
        "ray": ray,
        "ray_address": address,
        "ray_worker_cpus": worker_cpus,
        "ray_worker_gpus": worker_gpus,
    }
    s = base.model_copy(update={k: v for k, v in flags.items() if v is not None})
    server = server_config(s)
    console.print(
        f"promptserve: loading {s.model} ({s.backend or 'auto'}) with {s.workers} worker(s)…"
    )
    if s.ray:
        serve_on_ray(server, s)
        return
    app_ = build_app(server)
    if s.model == "tiny" and s.backend in (None, "tiny"):
        console.print("[yellow]the tiny model has random weights: its images are noise[/yellow]")
    uvicorn.run(app_, host=s.host, port=s.port, log_level="info")


def serve_on_ray(server, s) -> None:
    """Deploy on Ray Serve and keep the driver alive until Ctrl-C (then tear the app down)."""
    import time

    from ray import serve

    from promptserve.distributed import RaySettings, run_on_ray

    url = run_on_ray(server, RaySettings.from_settings(s))
    console.print(f"promptserve on Ray Serve at {url} (Ctrl-C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command("bench")
@user_errors
def bench_cmd(
    url: Annotated[
        str, typer.Option(help="Base URL of a running server, e.g. http://127.0.0.1:8000.")
    ],
    prompts: PromptsOpt = Path("data/diffusiondb_prompts_4k.txt"),
    arrivals: ArrivalsOpt = "poisson",
    rate: RateOpt = 30.0,
    minutes: MinutesOpt = 2.0,
    time_scale: TimeScaleOpt = 1.0,
    slo: Annotated[
        float, typer.Option("--slo", help="Deadline of every request in seconds.")
    ] = 60.0,
    api_key: Annotated[
        str | None,
        typer.Option(help="API key (also $PROMPTSERVE_API_KEY).", envvar="PROMPTSERVE_API_KEY"),
    ] = None,
    max_requests: Annotated[int, typer.Option(help="Stop after this many requests.", min=1)] = 5000,
    seed: SeedOpt = 0,
    out: Annotated[
        Path, typer.Option(help="Folder for report.json, report.md and timeline.png.")
    ] = Path("out/bench"),
) -> None:
    """Replay a workload against a live server; report the figures `simulate` reports."""
    import asyncio

    import httpx

    from promptserve.loadgen import replay_live
    from promptserve.sim.report import COLUMNS, write_report
    from promptserve.workload import (
        generate_arrivals,
        load_prompts,
        make_requests,
        parse_arrival_spec,
    )

    if not url.startswith(("http://", "https://")):
        raise InputError(f"--url {url!r} must start with http:// or https://")
    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(
            f"--url host {host!r}: load is only sent to this machine (127.0.0.1, localhost, ::1)"
        )
    times = generate_arrivals(
        parse_arrival_spec(arrivals),
        rate_qpm=rate,
        minutes=minutes,
        time_scale=time_scale,
        seed=seed,
    )
    requests = make_requests(load_prompts(prompts), times[:max_requests], slo)
    if not requests:
        raise InputError("the arrival spec produced no requests")
    try:
        httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise InputError(f"no promptserve server answers at {url} ({exc})") from None
    with progress() as bar:
        task = bar.add_task(f"sending {len(requests)} requests", total=len(requests))
        recs = asyncio.run(replay_live(url, requests, api_key, on_done=lambda: bar.advance(task)))
    row = recs.summary([])
    config = {
        "url": url,
        "arrivals": arrivals,
        "rate_qpm": rate,
        "minutes": minutes,
        "slo_s": slo,
        "requests": len(requests),
    }
    oracle = {"effective_quality_upper_bound": None, "slo_violation_ratio_lower_bound": None}
    write_report(out, config, {"live": row}, oracle, {"live": recs.per_minute()})
    table = Table(title=f"live run: {len(requests)} requests to {url}")
    for col in ("policy", *COLUMNS[:8]):
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row("live", *(str(row[c]) for c in COLUMNS[:8]))
    console.print(table)
    console.print(f"report written to {out}/report.json, report.md, timeline.png")


if __name__ == "__main__":
    app()
