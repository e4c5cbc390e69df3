"""Calling a remote service at scale: per-minute rate limits, retries with backoff and jitter.

`RateLimiter` is a token bucket refilled continuously (capacity = one minute's allowance);
`retry` runs an async call again on transient failures (`Transient`), waiting the server's
Retry-After when it gave one and an exponentially growing, fully jittered delay otherwise.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger("apo_dist.calls")
T = TypeVar("T")


class Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection error, malformed reply)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RetriesExhausted(RuntimeError):
    pass


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class RateLimiter:
    """At most `per_minute` units (requests or tokens) per minute; 0 = unlimited.

    No lock is needed: the event loop runs one coroutine at a time, and the check-and-take
    below has no await in between.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.stamp = time.monotonic()

    async def acquire(self, amount: float = 1.0) -> None:
        if self.rate <= 0:
            return
        amount = min(amount, self.capacity)  # a request larger than a minute's allowance waits a full minute
        while True:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.level >= amount:
                self.level -= amount
                return
            await asyncio.sleep((amount - self.level) / self.rate)


async def retry(call: Callable[[], Awaitable[T]], max_retries: int, what: str = "request") -> T:
    """`call()`, again after each Transient failure, at most `max_retries` more times."""
    for attempt in range(max_retries + 1):
        try:
            return await call()
        except Transient as e:
            if attempt == max_retries:
                raise RetriesExhausted(f"{what} failed {max_retries + 1} times; last error: {e}") from None
            delay = e.retry_after if e.retry_after is not None else backoff_delay(attempt)
            delay += random.uniform(0, 0.1)  # spread callers told the same Retry-After
            log.info("%s: %s; retry %d/%d in %.2f s", what, e, attempt + 1, max_retries, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
