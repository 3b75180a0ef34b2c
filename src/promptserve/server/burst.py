"""Calls that arrive while one is running wait for the next and go in it together: one
forward pass for a burst of prompts, one trip to the cache thread for a burst of lookups,
not one per request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class Burst(Generic[A, R]):
    def __init__(self, run_many: Callable[[list[A]], Awaitable[Sequence[R]]]) -> None:
        self.run_many = run_many  # one result per argument, in order
        self._queued: list[tuple[A, asyncio.Future]] = []
        self._task: asyncio.Task | None = None  # the task running queued calls

    async def __call__(self, arg: A) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queued.append((arg, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run_queued())
        return await future

    async def _run_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                results = await self.run_many([arg for arg, _ in batch])
            except Exception as exc:  # every waiting call hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
