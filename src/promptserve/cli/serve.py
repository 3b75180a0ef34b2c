"""``serve``: the OpenAI Images API on the live policy core, in-process or on Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptserve.cli.common import (
    JobsDirOpt,
    JobsInFlightOpt,
    JobsKeptBytesOpt,
    JobsKeptForOpt,
    JobsKeptOpt,
    WebhookAllowOpt,
    app,
    console,
    user_errors,
)
from promptserve.cli.listen import check_port_free, default_public_url, loading_lines, started_line
from promptserve.cli.rayserve import serve_on_ray


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
        str | None,
        typer.Option(help="tiny (built in) or a local diffusers folder (nothing is downloaded)."),
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
        str | None,
        typer.Option(
            help="Policy: promptserve-step (default: step-level serving), promptserve (GPUs "
            "pinned to levels, the published method's shape; for engines where one request "
            "fills the GPU), clipper-ha, clipper-ht, nirvana, proteus, argus, continuous-ha, "
            "continuous-ht, each with optional +shed, +admit, +fast (and, step-level, "
            "+blind: place by member count alone, whatever the sizes; +fixed-r: never raise "
            "a running member's feature-cache interval at a burst; +max-r: every member at "
            "the longest interval)."
        ),
    ] = None,
    embedder: Annotated[
        str | None, typer.Option(help="minilm (real) or hashing (tests only).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or mps.")] = None,
    cache_max_bytes: Annotated[
        str | None,
        typer.Option(
            help="Latent cache quota, with units (20GiB, 500MB) or bytes; default 10% of the "
            "free disk at start (logged). LCBFU eviction keeps within it."
        ),
    ] = None,
    embed_cache_max_rows: Annotated[
        int | None,
        typer.Option(help="Prompts kept in the embedding cache (default 1,000,000).", min=1),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="The weights' dtype (diffusers): auto (default: float16 on cuda and mps, "
            "float32 on cpu), float32, float16, bfloat16."
        ),
    ] = None,
    compile_: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile the denoiser (default off)."),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="CUDA graphs per in-flight size (torch.compile reduce-overhead; CUDA only).",
        ),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last", help="NHWC convolutions (UNet models only)."
        ),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(help="Attention kernels: sdpa (fused, default) or math (reference)."),
    ] = None,
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
    public_url: Annotated[
        str | None,
        typer.Option(
            help="Where clients reach this server (https://images.example.com): image links "
            "start with it; default relative links (/v1/images/ID), never the client's Host."
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="A measured profile (promptserve profile --out F) the planner and the step "
            "scheduler use; it must match the model's steps and levels. Default: one timed run "
            "and the reference batching curve.",
        ),
    ] = None,
    model_name: Annotated[
        list[str] | None,
        typer.Option(
            "--model-name",
            help="The id /v1/models shows and model= matches (repeat for aliases: the first is "
            "the id); default the model folder's name, never its path.",
        ),
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated WIDTHxHEIGHT sizes a request may ask for (the first is what "
            "size=auto gives); default the family's usual set at the model's own resolution "
            "(SDXL's aspect buckets, for example; the tiny model 64x64,32x32,96x64,64x96).",
        ),
    ] = None,
    lora_dir: Annotated[
        Path | None,
        typer.Option(
            help="A folder of LoRA adapters (NAME.safetensors, diffusers/PEFT or kohya layout) "
            "a request may name (lora: [{name, scale}]); each is checked at start.",
        ),
    ] = None,
    lora_resident: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1024,
            help="Adapters held on each worker's device at once (default 8); the rest wait in "
            "host memory and are loaded, least recently used out, when a request names one.",
        ),
    ] = None,
    feature_cache: Annotated[
        str | None,
        typer.Option(
            help="off|on (default on): feature caching (DeepCache for UNets, block reuse for "
            "SD3/Flux) as a second approximation axis, a full step every r (1 to --r-max), "
            "chosen per request with K by the step-level policy; its cost is measured at start.",
        ),
    ] = None,
    r_max: Annotated[
        int | None,
        typer.Option(help="The longest feature-cache interval offered (default 4).", min=1, max=63),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Denoising steps per image (default the family's: 50 for a UNet, 28 for SD3 "
            "and Flux, 8 for Z-Image); a few-step checkpoint is served with its own (4 for "
            "FLUX.1-schnell or SDXL-Lightning). The levels K follow it.",
            min=1,
            max=1000,
        ),
    ] = None,
    jobs_dir: JobsDirOpt = None,
    webhook_allow: WebhookAllowOpt = None,
    jobs_in_flight: JobsInFlightOpt = None,
    jobs_kept: JobsKeptOpt = None,
    jobs_kept_bytes: JobsKeptBytesOpt = None,
    jobs_kept_for: JobsKeptForOpt = None,
    latent_cache: Annotated[
        str | None,
        typer.Option(
            help="on|off (default on): approximate caching, a request resumed at K from a "
            "similar earlier prompt's latent. Off: every request runs every step and nothing "
            "is embedded, looked up or written (see the README on few-step models).",
        ),
    ] = None,
    select_cpu: Annotated[
        float | None,
        typer.Option(
            help="With a +select policy: the share of one core the selector's replays may take "
            "(default 0.1); a selection past it, or due while the last still runs, is skipped.",
            min=0.001,
            max=1.0,
        ),
    ] = None,
    max_inflight_megapixels: Annotated[
        float | None,
        typer.Option(
            help="Step-level serving: the most megapixels in flight on one GPU (a 1024x1024 "
            "image is 1.05); a join past it waits for a member to leave. Default no bound: "
            "deadlines alone set how many run.",
            min=0.001,
        ),
    ] = None,
    lora_resident_bytes: Annotated[
        str | None,
        typer.Option(
            help="At most this much device memory of resident adapters per worker, with units "
            "(2GiB, 500MB) or bytes; default no bound but --lora-resident.",
        ),
    ] = None,
    lora_private: Annotated[
        bool | None,
        typer.Option(
            "--lora-private/--lora-shared",
            help="Every request naming an adapter loads it at its join, resident or not, and "
            "admission counts that load: no tenant's timing or admission tells whether another "
            "used an adapter (default shared: a resident adapter joins without a load; "
            "docs/security.md).",
        ),
    ] = None,
    trusted_proxies: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated proxy addresses or networks (or *) whose X-Forwarded-* "
            "headers are believed and whose connections the per-client cap spares; default none."
        ),
    ] = None,
    max_header_bytes: Annotated[
        int | None,
        typer.Option(help="Largest request head in bytes, else 431 (default 16384).", min=1024),
    ] = None,
    max_headers: Annotated[
        int | None,
        typer.Option(help="Most header fields a request, else 431 (default 100).", min=8),
    ] = None,
    header_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request's head may take to arrive, else 408 (default 10).", min=0.1
        ),
    ] = None,
    body_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request's body may take after its head, else 408 (default 30).", min=0.1
        ),
    ] = None,
    send_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds an answer may sit unread by its client before the connection is "
            "dropped (default 30).",
            min=0.1,
        ),
    ] = None,
    max_connections_per_client: Annotated[
        int | None,
        typer.Option(help="Open connections one client address may hold (default 64).", min=1),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            help="Log one line a request (default on; off saves ~5% of the CPU under load).",
        ),
    ] = None,
    worker_gpus: Annotated[
        float | None,
        typer.Option(
            help="With --ray: GPUs per worker replica (default 1 on CUDA, else 0).", min=0
        ),
    ] = None,
    ingress_replicas: Annotated[
        int | None,
        typer.Option(
            help="With --ray: ingress replicas (default 1), each with its own slice of the "
            "workers; a tenant's requests all go to one (docs/ray.md).",
            min=1,
        ),
    ] = None,
) -> None:
    """Serve the OpenAI Images API on the live policy core (default: tiny model on the CPU)."""
    import uvicorn

    from promptserve.config import ServeFile, load_serve_file, server_config, validate_settings
    from promptserve.edge.protocol import uvicorn_config
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
        "dtype": dtype,
        "cache_max_bytes": cache_max_bytes,
        "embed_cache_max_rows": embed_cache_max_rows,
        "compile": compile_,
        "cuda_graphs": cuda_graphs,
        "channels_last": channels_last,
        "attention": attention,
        "cache_dir": cache_dir,
        "api_keys_file": api_keys,
        "speedup": speedup,
        "expected_qpm": expected_qpm,
        "ray": ray,
        "ray_address": address,
        "ray_worker_cpus": worker_cpus,
        "ray_worker_gpus": worker_gpus,
        "ray_ingress_replicas": ingress_replicas,
        "public_url": public_url,
        "model_names": model_name,
        "profile": profile,
        "sizes": sizes,
        "lora_dir": lora_dir,
        "lora_resident": lora_resident,
        "lora_resident_bytes": lora_resident_bytes,
        "lora_private": lora_private,
        "max_inflight_megapixels": max_inflight_megapixels,
        "feature_cache": feature_cache,
        "r_max": r_max,
        "select_cpu": select_cpu,
        "latent_cache": latent_cache,
        "jobs_dir": jobs_dir,
        "webhook_allow": webhook_allow,
        "jobs_in_flight": jobs_in_flight,
        "jobs_kept": jobs_kept,
        "jobs_kept_bytes": jobs_kept_bytes,
        "jobs_kept_s": jobs_kept_for,
        "steps": steps,
        "trusted_proxies": trusted_proxies.split(",") if trusted_proxies else None,
        "max_header_bytes": max_header_bytes,
        "max_headers": max_headers,
        "header_timeout_s": header_timeout,
        "body_timeout_s": body_timeout,
        "send_timeout_s": send_timeout,
        "max_connections_per_client": max_connections_per_client,
        "access_log": access_log,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    s = validate_settings({**base.model_dump(), **given}, "serve")  # flags named like the file
    if s.public_url is None:  # links a client can fetch: never built from a request's Host
        s = s.model_copy(update={"public_url": default_public_url(s.host, s.port)})
    server = server_config(s)
    if not (s.ray and s.ray_address):  # a cluster's own proxy binds elsewhere
        check_port_free(s.host, s.port)  # before the model loads (or Ray starts), not after
    console.print(loading_lines(s))
    if s.ray:
        serve_on_ray(server, s)
        return
    app_ = build_app(server)
    console.print(started_line(app_.state.runtime, s))
    http = uvicorn_config(
        app_, s.host, s.port, server.http, log_level="info", access_log=s.access_log
    )
    uvicorn.Server(http).run()
