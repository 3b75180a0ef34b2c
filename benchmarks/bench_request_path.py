"""Where one image's time goes in the live server, against the engine alone (the tiny model on
the CPU, the `make serve` default with the MiniLM embedder).

A served image once took 380-670 ms of server compute against the 0.18 s its quick profile
says. This splits a request's client-measured latency into: embedding the prompt, the rest of
the wait before its batch starts (cache lookup, the scheduler's wake-up), the hop into the
worker thread, text encoding, the denoising steps, decoding (VAE, PNG, captures), and the rest
(back to the event loop, base64, JSON, HTTP). It runs twice: one request at a time on an idle
server, then four clients at once, so contention (the engine sharing the CPU with embedding
and the HTTP thread) shows as the engine's own time growing. Prints one JSON line (medians,
milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from promptserve.engine.base import GenerationItem
from promptserve.server import ServerConfig, app_for, local_workers
from promptserve.server.live import LiveServer


class TimedEngine:
    """The engine, with the moments of each call kept: start, first step, last step, end."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[dict[str, float]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, items, on_step=None):
        marks = {"start": time.monotonic()}

        def step(i: int) -> None:
            marks.setdefault("first_step", time.monotonic())
            marks["last_step"] = time.monotonic()
            if on_step is not None:
                on_step(i)

        results = self.engine.generate(items, step)
        marks["end"] = time.monotonic()
        with self.lock:
            self.calls.append(marks)
        return results


def med(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 1) if xs else 0.0


def engine_alone(engine, n: int) -> float:
    engine.generate([GenerationItem("warm-up", 0, seed=0)])
    times = []
    for i in range(n):
        t0 = time.monotonic()
        engine.generate([GenerationItem(f"a lighthouse at dusk, study {i}", 0, seed=i)])
        times.append(time.monotonic() - t0)
    return med(times)


def run_clients(url: str, clients: int, per_client: int, tag: str) -> list[tuple[float, dict]]:
    """(client latency s, promptserve metadata) per answered image."""
    out: list[tuple[float, dict]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(per_client):
                t0 = time.monotonic()
                r = http.post(
                    f"{url}/v1/images/generations",
                    json={
                        "prompt": f"{tag} {c} {i}: a red fox in fresh snow",
                        "deadline_ms": 600000,
                    },
                )
                r.raise_for_status()
                with lock:
                    out.append((time.monotonic() - t0, r.json()["data"][0]["promptserve"]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def split(answers: list[tuple[float, dict]], calls: list[dict[str, float]], embed_ms: float):
    queue = [m["queue_ms"] / 1e3 for _, m in answers]
    compute = [m["compute_ms"] / 1e3 for _, m in answers]
    total = [t for t, _ in answers]
    encode = [c["first_step"] - c["start"] for c in calls]
    denoise = [c["last_step"] - c["first_step"] for c in calls]
    decode = [c["end"] - c["last_step"] for c in calls]
    engine = [c["end"] - c["start"] for c in calls]
    figures = {
        "client_total_ms": med(total),
        "embed_ms": embed_ms,
        "queue_ms": med(queue),
        "server_compute_ms": med(compute),
        "engine_ms": med(engine),
        "encode_ms": med(encode),
        "denoise_ms": med(denoise),
        "decode_ms": med(decode),
    }
    figures["hops_ms"] = round(figures["server_compute_ms"] - figures["engine_ms"], 1)
    figures["answer_ms"] = round(
        figures["client_total_ms"] - figures["queue_ms"] - figures["server_compute_ms"], 1
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="per phase")
    parser.add_argument("--embedder", default="minilm", help="minilm (serve's default), hashing")
    args = parser.parse_args()

    config = ServerConfig(embedder=args.embedder, cache_dir=Path(tempfile.mkdtemp()))
    workers = local_workers(config)  # the engine on its own thread, as `serve` builds it
    engine = workers.engines[0]
    alone_ms = workers.threads[0].call(engine_alone, engine, args.requests)
    timed = TimedEngine(engine)
    workers.engines[0] = timed
    app = app_for(config, workers)
    runtime = app.state.runtime

    def embed_alone() -> float:
        runtime.embedder.embed(["warm-up"])
        t0 = time.monotonic()
        for i in range(args.requests):
            runtime.embedder.embed([f"embed {i}: a red fox in fresh snow"])
        return round((time.monotonic() - t0) / args.requests * 1e3, 1)

    embed_ms = runtime._embed.thread.call(embed_alone)  # where the server embeds
    phases = {}
    with LiveServer(app) as url:
        run_clients(url, 1, 2, "warm")  # first-call costs out of the figures
        for name, clients in (("idle", 1), ("four_clients", 4)):
            timed.calls.clear()
            answers = run_clients(url, clients, max(1, args.requests // clients), name)
            phases[name] = split(answers, list(timed.calls), embed_ms)
    print(
        json.dumps(
            {
                "bench": "request_path",
                "model": "tiny",
                "embedder": args.embedder,
                "quick_profile_ms": round(workers.profile.batch_latency(0, 1) * 1e3, 1),
                "engine_alone_ms": alone_ms,
                **phases,
                "server_over_engine_alone": {
                    k: round(v["server_compute_ms"] / alone_ms, 2) for k, v in phases.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
