"""``bench``: replay a workload against a running server and report what it saw."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from promptserve.cli.common import (
    ArrivalsOpt,
    MinutesOpt,
    PromptsOpt,
    RateOpt,
    SeedOpt,
    TimeScaleOpt,
    app,
    console,
    progress,
    user_errors,
)
from promptserve.errors import InputError


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
    compare_sim: Annotated[
        bool,
        typer.Option(
            "--compare-sim/--no-compare-sim",
            help="Also simulate the same requests with the server's policy, GPUs, profile and "
            "embedder (GET /v1/server), and report both side by side. Start the server on an "
            "empty --cache-dir: the simulator starts with an empty cache.",
        ),
    ] = False,
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
    row["planner_ms_p50"] = live_planner_ms(url)  # the server's last plan, not a simulated one
    config = {
        "url": url,
        "arrivals": arrivals,
        "rate_qpm": rate,
        "minutes": minutes,
        "slo_s": slo,
        "requests": len(requests),
    }
    oracle = {"effective_quality_upper_bound": None, "slo_violation_ratio_lower_bound": None}
    rows, timelines = {"live": row | cache_mix(recs)}, {"live": recs.per_minute()}
    if compare_sim:
        from promptserve.sim.live import simulate_like

        server = httpx.get(f"{url}/v1/server", timeout=10).json()
        config["server"] = {k: v for k, v in server.items() if k != "profile"}
        sim, oracle, sim_timeline = simulate_like(server, requests, slo, seed)
        rows["simulated"], timelines["simulated"] = sim, sim_timeline
        rows["live"]["minus_simulated"] = live_minus_sim(rows["live"], sim)
        if float(server.get("speedup", 1.0)) != 1.0:
            console.print(
                "[yellow]note: this modelled server runs --speedup times faster than the profile "
                "its planner reads, and the simulator runs the sped-up profile, so the two plan "
                "for different GPUs; compare a server started with --speedup 1[/yellow]"
            )
    title = "Live run against the simulator" if compare_sim else "Live run"
    write_report(out, config, rows, oracle, timelines, title=title)
    table = Table(title=f"live run: {len(requests)} requests to {url}")
    for col in ("policy", *COLUMNS[:6], "hit_ratio"):
        table.add_column(col.replace("_", " "), justify="right")
    for name, r in rows.items():
        table.add_row(name, *(str(r[c]) for c in (*COLUMNS[:6], "hit_ratio")))
    console.print(table)
    if compare_sim:
        console.print(f"live minus simulated: {rows['live']['minus_simulated']}")
    console.print(f"report written to {out}/report.json, report.md, timeline.png")


def cache_mix(recs) -> dict:  # noqa: ANN001 - Records
    """The share of answers that started from a cached latent, and the K mix of the answers."""
    from promptserve.sim.live import cache_mix as mix

    return mix(recs)


def live_minus_sim(live: dict, sim: dict) -> dict:
    return {
        k: round(live[k] - sim[k], 4)
        for k in ("effective_quality", "slo_violation_ratio", "hit_ratio", "mean_quality")
    }


def live_planner_ms(url: str) -> float | None:
    """The server's last planner time (``promptserve_planner_ms_last``), None if unreadable."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("promptserve_planner_ms_last "):
            return round(float(line.split()[1]), 3)
    return None
