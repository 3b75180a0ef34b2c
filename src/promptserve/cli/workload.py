"""``workload inspect`` and ``thresholds show|refit``: look at a workload and its levels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from promptserve.cli.common import (
    ArrivalsOpt,
    CacheDirOpt,
    EmbedderOpt,
    MinutesOpt,
    PromptsOpt,
    RateOpt,
    SeedOpt,
    ThresholdsOpt,
    TimeScaleOpt,
    console,
    embed_with_progress,
    progress,
    thresholds_app,
    user_errors,
    workload_app,
)


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
    out: Annotated[Path, typer.Option(help="Where to write the PNG plot.")] = Path(
        "out/workload.png"
    ),
) -> None:
    """Print the arrival rate over time and the K_opt mix of a workload; write a PNG plot."""
    from promptserve.cache.index import CacheIndex
    from promptserve.cache.replay import replay
    from promptserve.cache.thresholds import embedder_thresholds, kopt_mix, load_thresholds
    from promptserve.quality import PUBLISHED_KOPT_MIX
    from promptserve.workload import (
        generate_arrivals,
        load_prompts,
        make_requests,
        parse_arrival_spec,
    )
    from promptserve.workload.inspect import plot_workload, rate_per_minute

    spec = parse_arrival_spec(arrivals)
    table = load_thresholds(thresholds) if thresholds else embedder_thresholds(embedder)
    texts = load_prompts(prompts)
    times = generate_arrivals(
        spec, rate_qpm=rate, minutes=minutes, time_scale=time_scale, seed=seed
    )
    qpm = rate_per_minute(times)
    # the simulator's requests: prompts in file order, a new tenant per pass over the file
    reqs = make_requests(texts, times, slo_s=0.0) if len(times) else []
    used = [r.prompt for r in reqs] if reqs else texts
    tenants = [r.tenant for r in reqs] if reqs else None
    unique_needed = list(dict.fromkeys(used))
    vecs = embed_with_progress(embedder, unique_needed, cache_dir)
    row_of = {p: i for i, p in enumerate(unique_needed)}
    embeddings = vecs[[row_of[p] for p in used]]
    index = CacheIndex(dim=embeddings.shape[1])
    with progress() as bar:
        task = bar.add_task("replaying through the cache", total=len(used))
        result = replay(
            used, embeddings, table, index, on_step=lambda _i: bar.advance(task), tenants=tenants
        )
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
