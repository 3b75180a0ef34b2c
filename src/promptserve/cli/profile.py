"""``profile`` and ``calibrate``: measure an engine and fit its thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from promptserve.cli.common import (
    CacheDirOpt,
    DeviceOpt,
    EmbedderOpt,
    ModelOpt,
    PromptsOpt,
    ThresholdsOpt,
    _int_list,
    app,
    console,
    embed_with_progress,
    progress,
    user_errors,
)
from promptserve.engine.devices import check_device
from promptserve.errors import InputError


@app.command("profile")
@user_errors
def profile_cmd(
    model: ModelOpt = "tiny",
    levels: Annotated[str, typer.Option(help="Levels K to measure; default: the model's.")] = "",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to measure.")] = "1,2,4,8",
    inflight: Annotated[
        str,
        typer.Option(
            help="In-flight counts to time one denoising step at (step-level serving); "
            "default: the batch sizes."
        ),
    ] = "",
    repeats: Annotated[int, typer.Option(help="Timed runs per point.", min=1, max=100)] = 1,
    device: DeviceOpt = "cpu",
    out: Annotated[Path, typer.Option(help="Where to write the measured profile JSON.")] = Path(
        "profile.json"
    ),
) -> None:
    """Measure batch latency per level and batch size, and step latency per in-flight count
    with the per-request encode and decode, on this device; write a profile file."""
    from promptserve.engine import make_engine
    from promptserve.engine.profiling import measure, measure_steps

    sizes = sorted(set(_int_list(batch_sizes, "--batch-sizes")))
    if sizes[0] != 1:
        raise InputError("--batch-sizes must include 1")
    counts = sorted(set(_int_list(inflight, "--inflight"))) if inflight else sizes
    if counts[0] != 1:
        raise InputError("--inflight must include 1")
    check_device(device)
    engine = make_engine(model, device=device)
    chosen = sorted(set(_int_list(levels, "--levels"))) if levels else list(engine.levels)
    bad = [k for k in chosen if k not in engine.levels]
    if bad or chosen[0] != 0:
        raise InputError(
            f"--levels must start at 0 and be among the model's levels {engine.levels}"
        )
    with progress() as bar:
        task = bar.add_task(f"profiling {model}", total=len(chosen) * len(sizes) + len(counts))
        measured = measure(
            engine, model, chosen, sizes, repeats, on_point=lambda *_: bar.advance(task)
        )
        measured.step = measure_steps(engine, counts, on_point=lambda *_: bar.advance(task))
    out.write_text(measured.model_dump_json(indent=2, exclude_none=True) + "\n")
    table = Table(title=f"batch latency (s), {model} on {device}")
    table.add_column("K")
    for b in sizes:
        table.add_column(f"batch {b}", justify="right")
    for k, row in zip(chosen, measured.batch_latency_s, strict=True):
        table.add_row(str(k), *(f"{v:.3f}" for v in row))
    console.print(table)
    if measured.step is not None:
        steps = Table(title="one denoising step (ms) against requests in flight")
        steps.add_column("step")
        for n in measured.step.inflight:
            steps.add_column(f"{n}", justify="right")
        steps.add_row("full", *(f"{v * 1e3:.1f}" for v in measured.step.step_latency_s))
        if measured.step.cached_step_latency_s:  # feature caching: every member cached
            steps.add_row(
                "cached", *(f"{v * 1e3:.1f}" for v in measured.step.cached_step_latency_s)
            )
        console.print(steps)
        console.print(
            f"per request: encode {measured.step.encode_s * 1e3:.1f} ms at join, "
            f"decode {measured.step.decode_s * 1e3:.1f} ms at leave"
        )
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
    r_max: Annotated[
        int,
        typer.Option(
            help="Feature caching: also score each interval 2..R_MAX and fit its loss "
            "(1: levels only; ignored for an engine without a feature cache).",
            min=1,
            max=16,
        ),
    ] = 4,
    out: Annotated[Path, typer.Option(help="Where to write the fitted constants (JSON).")] = Path(
        "quality_fit.json"
    ),
) -> None:
    """Measure q(s, K) on neighbour pairs and fit the quality model's constants (and, where
    the engine has a feature cache, the interval's)."""
    from promptserve.cache.index import CacheIndex
    from promptserve.cache.replay import replay
    from promptserve.cache.thresholds import embedder_thresholds, load_thresholds
    from promptserve.engine import make_engine
    from promptserve.engine.calibrate import fit, fit_intervals, measure_pairs
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
    check_device(device)
    engine = make_engine(model, device=device)
    r_max = r_max if engine.caps.feature_cache else 1
    intervals: list = []
    with progress() as bar:
        task = bar.add_task(f"calibrating ({judge.name})", total=len(triples))
        samples = measure_pairs(
            engine, judge, triples, table, lambda: bar.advance(task), r_max, intervals
        )
    fitted = fit(samples, engine.levels)
    report = {"model": model, "scorer": judge.name, **fitted.to_json()}
    by_interval = fit_intervals(intervals) if intervals else None
    if by_interval is not None:
        report["intervals"] = by_interval.to_json()
    out.write_text(json.dumps(report, indent=2) + "\n")
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
    if by_interval is not None:
        view = Table(title="feature caching: K = 0 at each interval r")
        view.add_column("r", justify="right")
        view.add_column("measured mean", justify="right")
        view.add_column("fitted q_r", justify="right")
        loss = by_interval.loss_per_share
        for r, q in by_interval.by_interval.items():
            view.add_row(str(r), f"{q:.2f}", f"{100 - loss * (r - 1) / r:.2f}")
        console.print(view)
        line = f"points lost when every step is cached: {loss:.3f}"
        if by_interval.combined_measured is not None:
            line += (
                f"; at (K_opt, r={r_max}): measured {by_interval.combined_measured:.2f}, "
                f"the product predicts {by_interval.combined_predicted:.2f}"
            )
        console.print(line)
    console.print(
        f"per level above K_opt: {fitted.per_level:.3f} points; cap {fitted.cap:.2f}; written to {out}"
    )
