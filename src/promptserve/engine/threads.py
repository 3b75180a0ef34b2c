"""One long-lived OS thread per engine, with torch's intra-op thread count set for it.

PyTorch on the CPU runs each op on an OpenMP team that belongs to the calling OS thread. When
more threads than cores sit in teams (the main thread's, the embedder's, and every pool thread
a batch happened to land on), libgomp stops spinning between ops and each op pays a futex
wake-up: the tiny model ran 2.5x slower inside the server than alone
(``benchmarks/bench_request_path.py``). So each engine builds, profiles and computes on one
thread of its own, the embedder on another, and their team sizes add up to at most the cores.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def torch_threads_for(engines: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``engines`` engines: the cores less one (the embedder and
    the event loop), shared out, at least one."""
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, engines))


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)  # OpenMP's thread count is per calling thread


class ComputeThread:
    """A thread that runs one engine's (or the embedder's) torch work, in order."""

    def __init__(self, name: str, torch_threads: int) -> None:
        self.torch_threads = torch_threads
        self._running = 0  # calls submitted and not yet returned (``idle``)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_set_torch_threads, initargs=(torch_threads,)
        )

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run ``fn`` there and wait (start-up: building and profiling the engine)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            self._running += 1
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._counted, fn, args)

    def _counted(self, fn: Callable[..., T], args: tuple) -> T:
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1

    @property
    def idle(self) -> bool:
        """Nothing queued or running here: a call its caller gave up on still counts until it
        returns (a GPU whose batch overran is not back before it is free)."""
        return self._running == 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
