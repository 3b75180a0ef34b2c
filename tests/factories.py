"""Small factories shared by the server tests: real servers, real clients."""

import json
import time
from functools import cache
from pathlib import Path

import httpx
import jsonschema
import openai

from promptserve.server import ServerConfig, build_app

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "openai_images_openapi.json"


def modeled_app(cache_dir, **overrides):
    """The server on the modelled engine (reference SDXL latencies), hashing embedder."""
    settings = dict(
        backend="modeled", model="sdxl-reference", embedder="hashing", cache_dir=cache_dir, slo_s=60
    )
    return build_app(ServerConfig(**(settings | overrides)))


def measured_profile(out, *flags):
    """``promptserve profile`` on the tiny model (with ``flags``), written to ``out``, loaded."""
    from typer.testing import CliRunner

    from promptserve.cli import app as cli
    from promptserve.profile import load_profile

    res = CliRunner().invoke(cli, ["profile", *flags, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return load_profile(out)


def tiny_app(cache_dir, **overrides):
    """The server on the tiny model (real latents on the CPU), hashing embedder, 120 s SLO."""
    settings = dict(model="tiny", embedder="hashing", cache_dir=cache_dir, slo_s=120)
    return build_app(ServerConfig(**(settings | overrides)))


@cache
def official(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the official OpenAPI description (its $refs resolved
    within the document)."""
    doc = json.loads(SCHEMA.read_text())
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


def check_official(response: httpx.Response) -> None:
    """Every successful JSON answer of the images endpoint must be an official
    ``ImagesResponse`` (streams are checked event by event where they are read)."""
    if not response.request.url.path.endswith(("/images/generations", "/images/edits")):
        return
    if response.status_code != 200 or "json" not in response.headers.get("content-type", ""):
        return
    response.read()
    official("ImagesResponse").validate(response.json())


def client(url, **options):
    """The official client on a local server (the key is ignored unless keys are set). Every
    image answer it gets is validated against the official schema."""
    timeout = options.pop("timeout", 600)
    http = httpx.Client(timeout=timeout, event_hooks={"response": [check_official]})
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=options.pop("api_key", "unused"),
        max_retries=0,
        http_client=http,
        timeout=timeout,
        **options,
    )


def staggered(engine, items) -> dict:  # noqa: ANN001 - an engine, generation items
    """Step-level results of ``items`` on one runner: the first two join together, the rest
    one step later (their steps fall between the first ones'); key i is item i."""
    runner = engine.step_runner()
    runner.join([(i, item) for i, item in enumerate(items[:2])])
    runner.step()
    runner.join([(i, item) for i, item in enumerate(items) if i >= 2])
    done: dict = {}
    while runner.slots:
        done.update(runner.step())
    return done


def tiny_server(tmp_path_factory, policy: str, **overrides):  # noqa: ANN001, ANN201
    """A module's tiny-model server under ``policy`` (a fixture yields from it): its URL."""
    from promptserve.server.live import LiveServer

    app = tiny_app(tmp_path_factory.mktemp("srv"), policy=policy, **overrides)
    with LiveServer(app) as url:
        yield url


def until_cached(url: str, entries: int, within_s: float = 60.0) -> None:
    """Wait until the server's cache holds ``entries``: a served run's entry is committed on
    the cache thread after its answer went out, so a twin sent at once may race it."""
    from promptserve.loadgen import read_metric

    deadline = time.monotonic() + within_s
    while read_metric(url, "promptserve_cache_entries") < entries:
        assert time.monotonic() < deadline, f"the cache never held {entries} entries"
        time.sleep(0.05)


# -- the step-level scheduler, driven through its contract ---------------------------------


def boundary(sched, gpu, now: float, steps: int):  # noqa: ANN001, ANN201 - a StepScheduler, its GPU
    """``gpu`` reports ``steps`` run and stands at a boundary, as a driver tells it
    (``update``): who left served, who joined (the work handed out for it), who was dropped."""
    from promptserve.policy.contract import Report
    from promptserve.policy.types import Status

    outcomes = sched.update(now, gpu.index, Report(steps=steps))
    work = [w for w in sched.schedule(now).work if w.gpu == gpu.index and w.joins]
    joined = list(work[-1].joins) if work else []
    served = [o for o in outcomes if o.status == Status.SERVED]
    return served, joined, [o for o in outcomes if o.status != Status.SERVED]


def make_asks(n: int, deadline_s: float = 60.0, start: int = 0, **fields):  # noqa: ANN003, ANN201
    """``n`` asks with ids from ``start``, each due at ``deadline_s`` (the rest as given)."""
    from promptserve.policy.contract import Ask

    fields.setdefault("k_opt", 0)
    fields.setdefault("has_neighbour", False)
    return [Ask(start + i, deadline_s, **fields) for i in range(n)]
