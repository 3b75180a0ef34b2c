"""The one thread the cache's files and manifest are touched from, with two queues: what a
request waits for (its start latents read before its run, the unpins after it) goes first;
the writes of answered runs, which nobody waits for, go when nothing else is queued. So a
batch about to start never waits behind a trip of writes, however many are queued. Within
each queue calls run in the order they came."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future


class CacheThread(Executor):
    def __init__(self, name: str) -> None:
        self._now: deque[tuple[Future, Callable, tuple, dict]] = deque()
        self._later: deque[tuple[Future, Callable, tuple, dict]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """A call a request waits for: ahead of every queued write."""
        return self._put(self._now, fn, args, kwargs)

    def submit_later(self, fn: Callable, /, *args, **kwargs) -> Future:
        """A call nobody waits for: after whatever a request waits for."""
        return self._put(self._later, fn, args, kwargs)

    def _put(self, queue: deque, fn: Callable, args: tuple, kwargs: dict) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the cache thread has shut down")
            queue.append((future, fn, args, kwargs))
            self._ready.notify()
        return future

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._now and not self._later and not self._closed:
                    self._ready.wait()
                if not self._now and not self._later:
                    return  # closed, and everything queued has run
                future, fn, args, kwargs = (self._now or self._later).popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # the caller hears it, the thread goes on
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Let what is queued run (unless ``cancel_futures``), then end the thread."""
        with self._ready:
            self._closed = True
            if cancel_futures:
                for queue in (self._now, self._later):
                    while queue:
                        queue.popleft()[0].cancel()
            self._ready.notify()
        if wait:
            self._thread.join()
