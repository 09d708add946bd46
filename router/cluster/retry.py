"""The one retry policy: capped exponential backoff with jitter, Retry-After honoured.

Used by the informers, the NetworkPolicy loop, the lease loop and the reloader's crash
backoff. ``BackoffPolicy`` is the pure rule (attempt n -> delay); ``Backoff`` counts attempts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The n-th delay (from 0) is ``min(maximum, initial * factor**n)`` reduced by up to
    ``jitter`` (a fraction) at random; a Retry-After from the server raises it (still capped)."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rng: Callable[[], float] = random.random,
    ) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        delay = base * (1.0 - self.jitter * rng()) if self.jitter else base
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.maximum))
        return delay


@dataclass
class Backoff:
    """``BackoffPolicy`` with an attempt counter: ``next()``, ``reset()``, ``sleep()``."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    attempts: int = 0
    rng: Callable[[], float] = field(default=random.random, repr=False)

    @property
    def policy(self) -> BackoffPolicy:
        return BackoffPolicy(self.initial, self.maximum, self.factor, self.jitter)

    def next(self, retry_after: float | None = None) -> float:
        delay = self.policy.delay(self.attempts, retry_after, self.rng)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0

    async def sleep(self, retry_after: float | None = None) -> float:
        delay = self.next(retry_after)
        await asyncio.sleep(delay)
        return delay
