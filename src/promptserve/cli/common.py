"""What every command shares: the Typer apps, error handling, progress bars, the flags."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from promptserve.errors import InputError

app = typer.Typer(help="Prompt-aware text-to-image serving.", no_args_is_help=True)
workload_app = typer.Typer(
    help="Inspect workloads: arrivals and prompt mixes.", no_args_is_help=True
)
thresholds_app = typer.Typer(help="Similarity -> K thresholds per embedder.", no_args_is_help=True)
app.add_typer(workload_app, name="workload")
app.add_typer(thresholds_app, name="thresholds")


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        typer.echo(f"promptserve {version('promptserve')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Prompt-aware text-to-image serving."""


# tables are never cut to a terminal's width: without a TTY (make, CI, a pipe) rich would
# assume 80 columns and truncate the last ones ("0.0…")
console = Console(width=None if Console().is_terminal else 200)
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


def progress() -> Progress | LineProgress:
    """A live bar on a terminal; without one (CI, a pipe, a log file), a line per 10% and at
    least every 30 s, so long runs still show that they move."""
    if not err_console.is_terminal:
        return LineProgress()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


class LineProgress:
    """``Progress``'s add_task/advance as plain lines on stderr."""

    EVERY_S = 30.0

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        import time

        self._clock = clock or time.monotonic
        self._tasks: dict[int, list] = {}  # id -> [description, total, done, last tenth, last t]

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        task = len(self._tasks)
        self._tasks[task] = [description, total or 0, 0, 0, self._clock()]
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        entry = self._tasks[task]
        entry[2] += advance
        description, total, done, last_tenth, last_t = entry
        tenth = int(10 * done / total) if total else 0
        now = self._clock()
        if tenth > last_tenth or now - last_t >= self.EVERY_S:
            entry[3], entry[4] = tenth, now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            err_console.print(f"{description}: {done:g}/{total:g}{share}", highlight=False)


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
ModelOpt = Annotated[
    str, typer.Option(help="tiny (built in) or a local diffusers folder (nothing is downloaded).")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or mps.")]
ThresholdsOpt = Annotated[str, typer.Option(help="Shipped table name or a thresholds JSON file.")]
CacheDirOpt = Annotated[
    Path, typer.Option("--cache-dir", help="Folder for on-disk caches (embeddings).")
]


PoliciesOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated policies, each "
        "NAME[+shed][+admit][+fast][+blind][+fixed-r][+max-r][+select] "
        "(NAME: clipper-ha, clipper-ht, nirvana, proteus, argus, promptserve, "
        "promptserve-step, continuous-ha, continuous-ht). Default: the fair set (the published "
        "method as shipped, every rival with promptserve's queue and admission and, with "
        "feature caching on, each step-level rival also at +max-r)."
    ),
]
SplitOpt = Annotated[
    str,
    typer.Option(
        help="all|tune|held-out: the whole prompt file and trace, or one half of each "
        "(docs/comparison.md); a seed picks where the replay of the prompts and a trace starts.",
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


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise InputError(f"{flag} {text!r} needs at least one integer >= 0")
    return values


SizeMixOpt = Annotated[
    str | None,
    typer.Option(
        help="A size per request from a mix, e.g. 1024x1024:0.6,1152x896:0.2,896x1152:0.2 (the "
        "first the model's own): a request resumes only from a neighbour of its size.",
    ),
]
EditsOpt = Annotated[
    str | None,
    typer.Option(
        help="SHARE:LO-HI: that share of requests are edits (image-to-image), each at a "
        "strength uniform in [LO, HI], e.g. 0.3:0.3-0.8; an edit runs from its own start step "
        "and never uses the cache.",
    ),
]
BatchOpt = Annotated[
    str | None,
    typer.Option(
        help="SHARE:DEADLINE_S: a background stream (priority batch) beside the requests, "
        "SHARE of all of them, submitted evenly over their span, each due DEADLINE_S after; "
        "it runs on what the interactive requests leave (step-level policies; a pinned one "
        "serves it as interactive work with a long deadline). The figures are the "
        "interactive requests', the stream's under 'background'.",
    ),
]
FeatureCacheOpt = Annotated[
    str,
    typer.Option(
        help="off|on: feature caching as a second approximation axis, a full step every r "
        "(1 to --r-max), chosen per request with K by the step-level price (promptserve-step); "
        "a cached step at the profile's share of a full one (the reference: DeepCache's SDXL). "
        "Default on, as serve runs.",
    ),
]
CachedShareOpt = Annotated[
    str,
    typer.Option(
        "--cached-step-share",
        help="With --feature-cache on and a profile that has none: a cached step's time over a "
        "full one's, as a family's published figure (sdxl 0.077, sd1 0.29, sd3 and flux 0.16; "
        "docs/feature-cache.md has the sources) or a number in (0, 1).",
    ),
]
RMaxOpt = Annotated[
    int, typer.Option(help="The longest feature-cache interval offered.", min=1, max=63)
]
AdaptersOpt = Annotated[
    str | None,
    typer.Option(
        help="N:ALPHA[:RESIDENT[:LOAD_S]]: a LoRA adapter per request, drawn Zipf(ALPHA) over "
        "N (a request resumes only from a neighbour of its adapter); RESIDENT of them held per "
        "GPU at once (default all), LOAD_S seconds a load (default 0.05).",
    ),
]


def look_mix(size_mix: str | None, adapters: str | None):  # noqa: ANN201 - a LookMix
    """What ``--size-mix`` and ``--adapters`` ask for (``workload.looks``)."""
    from promptserve.workload.looks import LookMix, parse_adapters, parse_size_mix

    sizes, weights = parse_size_mix(size_mix) if size_mix else ((), ())
    count, alpha, resident, load_s = parse_adapters(adapters) if adapters else (0, 1.0, 0, 0.0)
    return LookMix(sizes, weights, count, alpha, resident, load_s)


JobsDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder of the durable job store, jobs.sqlite (default the cache folder): every "
        "job answered 202 is written there first, and a restart runs the unfinished ones "
        "again (a background job from its last written step) and keeps the finished ones "
        "retrievable.",
    ),
]
WebhookAllowOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="A host name or an address/CIDR jobs' webhook_url may point at (repeatable; "
        "none: webhooks are off). A listed name resolving to a private, loopback or "
        "link-local address must have that network listed too.",
    ),
]
JobsInFlightOpt = Annotated[
    int | None,
    typer.Option(
        help="Jobs a tenant may have queued or running at once (default 1000); past it a new "
        "job is 429 with Retry-After.",
        min=1,
    ),
]
JobsKeptOpt = Annotated[
    int | None, typer.Option(help="Finished jobs kept per tenant (default 256).", min=1)
]
JobsKeptBytesOpt = Annotated[
    str | None,
    typer.Option(help="Their results' bytes kept per tenant, e.g. 256MiB (the default)."),
]
JobsKeptForOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a finished job is kept (default 3600); then deleted, from the disk too.",
        min=1,
    ),
]
