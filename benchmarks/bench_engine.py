"""Tiny model on this CPU: a resumed run's time at each K over the full run's, beside (N - K) / N,
and batch throughput at 1, 2, 4 and 8 (images per second). Prints one JSON line."""

from __future__ import annotations

import json
import time

from promptserve.engine import GenerationItem, make_engine


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    engine = make_engine("tiny")
    base = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=0)])[0]
    n = engine.total_steps
    full = timed(lambda: engine.generate([GenerationItem("a harbour at night", 0, seed=1)]))
    resume = {}
    for k in engine.levels[1:]:
        t = timed(
            lambda k=k: engine.generate([GenerationItem("a harbour at night", k, base.latents[k])])
        )
        resume[f"K{k}"] = {"time_over_full": round(t / full, 3), "ideal": round((n - k) / n, 3)}
    throughput = {}
    for b in (1, 2, 4, 8):
        items = [GenerationItem(f"prompt {i}", 0, seed=i) for i in range(b)]
        throughput[f"batch_{b}"] = round(
            b / timed(lambda items=items: engine.generate(items), 2), 2
        )
    print(
        json.dumps(
            {
                "bench": "engine",
                "model": "tiny",
                "device": "cpu",
                "total_steps": n,
                "full_run_s": round(full, 3),
                "resume": resume,
                "images_per_s": throughput,
                "batch_8_over_1": round(throughput["batch_8"] / throughput["batch_1"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
