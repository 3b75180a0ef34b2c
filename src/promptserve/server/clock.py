"""How the live runtime waits: every wait of its loops goes through one ``Pause``, beside its
``clock``, so a test can drive the runtime on a clock of its own by passing both."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable

Pause = Callable[[float, "asyncio.Event | None"], Awaitable[None]]


async def wall_pause(seconds: float, event: asyncio.Event | None = None) -> None:
    """Wait ``seconds`` (inf: for ever) on the event loop's clock, or until ``event`` is set.
    asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that lands as the
    wake-up fires, and stop() would then wait on the loop for ever."""
    if event is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds if math.isfinite(seconds) else None):
            await event.wait()
