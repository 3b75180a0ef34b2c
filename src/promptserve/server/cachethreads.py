"""The cache's two threads, off the event loop: every cache call but lookups runs in order on
one (latent files, SQLite commits), lookups on the other, after the writes queued before them.
Writes nobody waits for (a served run's) go in trips: what is queued before the cache thread
gets to it goes in one trip and one group (one manifest transaction, folder fsyncs once a
window: ``ApproxCache.group``), so the more answers come at once, the fewer commits each costs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from promptserve.cache.approx import ApproxCache
from promptserve.server.cachework import pinned_by
from promptserve.server.requests import Counters
from promptserve.workers.base import StoreRefs

log = logging.getLogger(__name__)


class CacheThreads:
    def __init__(self, cache: ApproxCache, counters: Counters) -> None:
        self.cache, self.counters = cache, counters
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="promptserve-cache")
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="promptserve-lookup")
        self.writes: set[asyncio.Future] = set()  # trips queued by ``later``
        self._later: list[tuple[Callable, tuple]] = []  # writes the next trip takes together
        self._lock = threading.Lock()
        self._trip_queued = False

    async def call(self, fn: Callable, *args: object):  # noqa: ANN201 - fn's own result
        """``fn(*args)`` on the cache thread, after everything queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, fn, *args)

    def later(self, fn: Callable, *args: object) -> None:
        """Queue cache work nobody waits for: the GPU takes its next work at once. A trip is
        queued on the cache thread when its first write is, so cache work queued after a
        write still runs after it; ``stop`` lets the queued trips finish."""
        with self._lock:
            self._later.append((fn, args))
            if self._trip_queued:
                return
            self._trip_queued = True
        future = asyncio.get_running_loop().run_in_executor(self.writer, self._trip)
        self.writes.add(future)
        future.add_done_callback(self.writes.discard)

    def _trip(self) -> None:
        """One trip of queued writes, on the cache thread, as one group."""
        with self._lock:
            batch, self._later, self._trip_queued = self._later, [], False
        self.counters.write_trips += 1
        try:
            with self.cache.group():  # writes nested in it commit here, once
                for fn, args in batch:
                    fn(*args)
        except Exception:  # nobody awaits this trip: log and count it, never lose it silently
            log.exception("cache commit failed for a trip of %d writes", len(batch))
            self.counters.cache_update_failures += len(batch)

    async def lookup(self, fn: Callable[[], list]) -> list:
        """``fn`` on the lookup thread once the write trips queued before it have landed: a
        request sees every run answered before it arrived, as the simulator's requests do."""
        if self.writes:
            await asyncio.gather(*list(self.writes), return_exceptions=True)
        return await asyncio.get_running_loop().run_in_executor(self.reader, fn)

    async def unpin(self, refs: Sequence[StoreRefs | None]) -> None:
        """Unpin the cache entries a finished (or failed) run read its start latents from."""
        ids = pinned_by(refs)
        if ids:
            await self.call(lambda: [self.cache.unpin(i) for i in ids])

    async def stop(self) -> None:
        await asyncio.gather(*self.writes, return_exceptions=True)  # the queued writes land
        await self.call(self.cache.sync)  # and the durability window closes
        self.shutdown()

    def shutdown(self) -> None:
        self.writer.shutdown(wait=True)
        self.reader.shutdown(wait=True)
