"""An asyncio event loop on a virtual clock, for driving the live runtime as fast as it can go.

Time stands still while anything is ready to run or any executor call (the runtime's cache and
embedder threads, a plan solved in a thread) is in flight, and jumps to the next timer when the
loop would otherwise sleep: the runtime's own loops, sleeps and timeouts run unchanged, as on an
infinitely fast machine, and every reading of ``loop.time()`` is exact.
"""

import asyncio
import selectors
import threading


class _Selector(selectors.BaseSelector):
    """The loop's own selector, except that an idle wait advances the virtual clock."""

    def __init__(self, loop: "VirtualLoop", real: selectors.BaseSelector) -> None:
        self.loop, self.real = loop, real

    def select(self, timeout=None):  # noqa: ANN001, ANN201 - as BaseSelector.select
        if timeout == 0:
            return self.real.select(0)
        if self.loop.in_flight():  # a thread's answer wakes the loop: wait for it, time stands
            return self.real.select(None)
        events = self.real.select(0)
        if events or timeout is None:  # None: no timer at all, only I/O can wake it
            return events or self.real.select(None)
        # to the timer itself, not now + timeout: the runtime reads the exact time it set
        due = self.loop._scheduled[0].when() if self.loop._scheduled else self.loop.now + timeout
        self.loop.now = max(self.loop.now, due)
        return []

    def register(self, fileobj, events, data=None):  # noqa: ANN001, ANN201
        return self.real.register(fileobj, events, data)

    def unregister(self, fileobj):  # noqa: ANN001, ANN201
        return self.real.unregister(fileobj)

    def modify(self, fileobj, events, data=None):  # noqa: ANN001, ANN201
        return self.real.modify(fileobj, events, data)

    def get_map(self):  # noqa: ANN201
        return self.real.get_map()

    def close(self) -> None:
        self.real.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        super().__init__(_Selector(self, selectors.DefaultSelector()))
        self.now = start
        self._calls = 0
        self._lock = threading.Lock()

    def time(self) -> float:
        return self.now

    def in_flight(self) -> bool:
        with self._lock:
            return self._calls > 0

    def run_in_executor(self, executor, func, *args):  # noqa: ANN001, ANN201
        """Counted until its answer is back on the loop (not when the thread returns: the loop
        must not jump ahead while the answer is on its way)."""
        with self._lock:
            self._calls += 1
        future = super().run_in_executor(executor, func, *args)
        future.add_done_callback(self._answered)
        return future

    def _answered(self, _future) -> None:  # noqa: ANN001
        with self._lock:
            self._calls -= 1
