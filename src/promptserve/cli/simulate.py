"""``simulate`` and ``sweep``: the policy comparison on the simulator, with the offline bound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from promptserve.cli.common import (
    AdaptersOpt,
    ArrivalsOpt,
    BatchOpt,
    CacheDirOpt,
    CachedShareOpt,
    EditsOpt,
    EmbedderOpt,
    FeatureCacheOpt,
    MinutesOpt,
    PenaltyOpt,
    PoliciesOpt,
    ProfileOpt,
    PromptsOpt,
    RateOpt,
    RMaxOpt,
    SeedOpt,
    SizeMixOpt,
    SloOpt,
    SplitOpt,
    TimeScaleOpt,
    _int_list,
    app,
    console,
    embed_with_progress,
    look_mix,
    progress,
    user_errors,
)
from promptserve.errors import InputError
from promptserve.policy.policies import fair_policies

# short headers, so an 80-column terminal keeps the policy names whole
SHORT = {
    "effective_quality": "eff. Q",
    "mean_quality": "mean Q",
    "slo_violation_ratio": "viol.",
    "served_in_slo": "in SLO",
    "served_late": "late",
    "goodput_qpm": "qpm",
}


def for_people(column: str, value: object) -> str:
    """97.7, not 97.7411; 0, not 0.000; ratios to three places."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, float | int):
        return str(value)
    if column.endswith("ratio"):
        return "0" if value == 0 else f"{value:.3f}"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.1f}"


@app.command("simulate")
@user_errors
def simulate_cmd(
    policies: PoliciesOpt = None,
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
    size_mix: SizeMixOpt = None,
    adapters: AdaptersOpt = None,
    edits: EditsOpt = None,
    batch: BatchOpt = None,
    feature_cache: FeatureCacheOpt = "on",
    r_max: RMaxOpt = 4,
    cached_step_share: CachedShareOpt = "sdxl",
    seed: SeedOpt = 0,
    split: SplitOpt = "all",
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
    from promptserve.sim.compare import CompareConfig, compare, config_dict, sim_inputs
    from promptserve.sim.report import COLUMNS, write_report
    from promptserve.workload import (
        generate_arrivals,
        load_prompts,
        make_requests,
        parse_arrival_spec,
    )
    from promptserve.workload.batch import parse_batch, with_batch
    from promptserve.workload.edits import parse_edits, with_edits
    from promptserve.workload.looks import sized_profile, with_looks
    from promptserve.workload.splits import check_split, prompt_order

    chosen = parse_policies(policies or fair_policies(feature_cache == "on"))
    prof, slo_s = _profile_slo_penalty(
        profile, slo, quality_penalty, feature_cache, r_max, cached_step_share
    )
    spec = parse_arrival_spec(arrivals)
    part = check_split(split)
    loaded = load_prompts(prompts)
    texts = [loaded[i] for i in prompt_order(len(loaded), part, seed)]
    times = generate_arrivals(
        spec, rate_qpm=rate, minutes=minutes, time_scale=time_scale, seed=seed, split=part
    )
    if len(times) == 0:
        raise InputError("the arrival spec produced no requests")
    mix = look_mix(size_mix, adapters)
    requests = with_looks(make_requests(texts, times, slo_s), mix, seed)
    requests = with_edits(requests, parse_edits(edits) if edits else None, seed)
    requests = with_batch(requests, parse_batch(batch) if batch else None, texts, seed)
    prof = sized_profile(prof, mix)
    distinct = list(dict.fromkeys([r.prompt for r in requests] + texts[:warm]))
    vecs = embed_with_progress(embedder, distinct, cache_dir)
    row = {p: i for i, p in enumerate(distinct)}
    embeddings = vecs[[row[r.prompt] for r in requests]]
    warm_pair = (texts[:warm], vecs[[row[p] for p in texts[:warm]]]) if warm else None
    thresholds = embedder_thresholds(embedder)
    config = CompareConfig(gpus, slo_s, quality_penalty, seed, warm)  # type: ignore[arg-type]
    with progress() as bar:
        tasks = {p.name: bar.add_task(f"simulating {p.name}", total=len(requests)) for p in chosen}
        inputs = sim_inputs(requests, embeddings, prof, thresholds, config, warm_pair)
        rows, oracle, timelines, _ = compare(
            chosen,
            inputs,
            config,
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
        "size_mix": size_mix,
        "feature_cache": feature_cache,
        "adapters": adapters,
        "edits": edits,
        "batch": batch,
    }
    write_report(out, config_dict(config, **extra), rows, oracle, timelines, html=html)
    background = sum(r.batch for r in requests)
    counted = f"{len(requests) - background} requests" + (
        f" (+{background} background)" if background else ""
    )
    table = Table(title=f"{counted}, {gpus} GPUs, SLO {slo_s} s, penalty {quality_penalty}")
    # names must stay whole on an 80-column terminal; the short headers may wrap instead
    table.add_column("policy", no_wrap=True, min_width=max(len(n) for n in [*rows, "oracle bound"]))
    shown = COLUMNS[:7]  # goodput and latencies are in report.md
    for col in shown:
        table.add_column(SHORT.get(col, col.replace("_", " ")), justify="right")
    for name, r in rows.items():
        table.add_row(name, *(for_people(c, r[c]) for c in shown))
    table.add_row(
        "oracle bound",
        for_people("effective_quality", oracle["effective_quality_upper_bound"]),
        "",
        for_people("slo_violation_ratio", oracle["slo_violation_ratio_lower_bound"]),
        *[""] * 4,
    )
    console.print(table)
    for name, r in rows.items():
        if "background" in r:
            bg = r["background"]
            console.print(
                f"{name}: background {bg['served']}/{bg['jobs']} served, {bg['dropped']} "
                f"expired, the last at {bg['last_finish_s']} s (the table: interactive only)"
            )
    written = "report.json, report.md, timeline.png" + (", report.html" if html else "")
    console.print(f"report written to {out}/: {written}")


def _profile_slo_penalty(
    profile: Path | None,
    slo: float | None,
    penalty: str,
    feature_cache: str = "off",
    r_max: int = 1,
    cached_share: str = "sdxl",
):
    """The profile (default: the SDXL reference) and the SLO (default: 5x its full-quality
    latency), the penalty shape checked; with ``feature_cache`` on, its cached step (the
    profile's own share, else ``--cached-step-share``'s)."""
    from promptserve.cachedstep import cached_share_of
    from promptserve.profile import load_profile, reference_profile, with_feature_cache
    from promptserve.sim.compare import default_slo

    if penalty not in ("mild", "steep"):
        raise InputError(f"--quality-penalty {penalty!r} is not mild or steep")
    if feature_cache not in ("off", "on"):
        raise InputError(f"--feature-cache {feature_cache!r} is not off or on")
    prof = load_profile(profile) if profile else reference_profile()
    if feature_cache == "on":
        share = prof.cached_step_share or cached_share_of(cached_share)
        prof = with_feature_cache(prof, share, r_max)
    slo_s = slo if slo is not None else default_slo(prof)
    if slo_s <= 0:
        raise InputError(f"--slo must be > 0 seconds, got {slo_s}")
    return prof, slo_s


@app.command("sweep")
@user_errors
def sweep_cmd(
    policies: PoliciesOpt = None,
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
    split: SplitOpt = "all",
    profile: ProfileOpt = None,
    slo: SloOpt = None,
    quality_penalty: PenaltyOpt = "steep",
    oracle_window: Annotated[
        float, typer.Option(help="The oracle bound's time slot in seconds.", min=0.01)
    ] = 1.0,
    embedder: EmbedderOpt = "minilm",
    cache_dir: CacheDirOpt = Path(".promptserve"),
    size_mix: SizeMixOpt = None,
    adapters: AdaptersOpt = None,
    edits: EditsOpt = None,
    batch: BatchOpt = None,
    feature_cache: FeatureCacheOpt = "on",
    r_max: RMaxOpt = 4,
    cached_step_share: CachedShareOpt = "sdxl",
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
    from promptserve.workload.batch import parse_batch
    from promptserve.workload.edits import parse_edits
    from promptserve.workload.splits import check_split

    chosen = parse_policies(policies or fair_policies(feature_cache == "on"))
    prof, slo_s = _profile_slo_penalty(
        profile, slo, quality_penalty, feature_cache, r_max, cached_step_share
    )
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
        oracle_window, looks=look_mix(size_mix, adapters), split=check_split(split),
        edits=parse_edits(edits) if edits else None, batch=parse_batch(batch) if batch else None,
    )  # fmt: skip
    with progress() as bar:
        task = bar.add_task("sweep points", total=len(rate_list) * len(seed_list))
        result = run_sweep(
            chosen, texts, vecs, prof, thresholds, config, lambda _p: bar.advance(task)
        )
    summary = write_sweep(out, result)
    # a row per policy, a column per rate: names stay whole however many policies there are
    table = Table(title=f"effective quality, mean over seeds {list(seed_list)} ({arrivals})")
    table.add_column(
        "policy \\ qpm", no_wrap=True, min_width=max(len(p.name) for p in [*chosen]) + 1
    )
    for row in summary:
        table.add_column(f"{row['rate_qpm']:g}", justify="right")
    for p in chosen:
        table.add_row(
            p.name, *(f"{r['policies'][p.name]['effective_quality']['mean']:.1f}" for r in summary)
        )
    table.add_row(
        "oracle bound",
        *(
            for_people("effective_quality", r["oracle"]["effective_quality"]["mean"])
            for r in summary
        ),
    )
    console.print(table)
    console.print(f"sweep written to {out}/: sweep.json, sweep.md, sweep.png, sweep.html")
