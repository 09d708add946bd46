"""Waiting without sleeps: a Signal to wait on, a task run for a block, a fast retry policy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from router.cluster.retry import Backoff


class Signal:
    """Wait for a condition without sleeping: notify() on change, wait_for(predicate)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0

    def notify(self) -> None:
        self.count += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 1.0) -> None:
        """Return once predicate() holds, re-checked after each notify; TimeoutError if never."""

        async def waiter() -> None:
            while not predicate():
                await self._event.wait()

        await asyncio.wait_for(waiter(), within)


def fast_backoff() -> Backoff:
    """A retry policy short enough for tests."""
    return Backoff(initial=0.005, maximum=0.02)


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the block's duration; cancel and await it afterwards."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
