"""Helpers for testing code that uses taskd, as ``aiohttp.test_utils`` is for aiohttp.

Import it as ``taskd.testing`` (it is not re-exported from ``taskd``)::

    from taskd.testing import FakeClock, eventually

    async def test_a_task_expires() -> None:
        clock = FakeClock()
        async with taskd.Tracker(clock=clock, retention=taskd.Retention(completed_ttl=60)) as t:
            ...
            clock.advance(61)
            await eventually(lambda: ...)

``FakeClock`` is a wall clock the test moves by hand, so that TTLs, heartbeat
timeouts and ``updated_at`` are deterministic. ``eventually`` waits for a condition a
test can observe (``await tracker.stats()``, ``/metrics``, a line in a log) instead of
sleeping for a guessed time, which is both slower and flaky on a loaded machine.
docs/embedding.md, "Testing your code", shows both in use.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["FakeClock", "eventually"]


class FakeClock:
    """A wall clock the test moves by hand: pass it as ``Tracker(clock=...)``.

    The tracker reads it once per batch of commands (for ``created_at``,
    ``updated_at`` and every TTL and heartbeat deadline), so after ``advance`` the next
    command, or the next timer tick, sees the new time. A step back is allowed (wall
    clocks do step back); the tracker never lets ``updated_at`` go backwards.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        #: Seconds since the epoch that the clock reads now (a fixed, recent instant
        #: by default, so that timestamps in failures are reproducible).
        self.now = start

    def __call__(self) -> float:
        """The current time, in seconds since the epoch (what ``time.time`` returns)."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds``: forwards, or backwards when negative (a wall
        clock stepped back, as NTP may do)."""
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.01,
) -> None:
    """Return once ``predicate()`` is true; ``AssertionError`` if it is still false after
    ``timeout`` seconds.

    ``predicate`` is a plain function or a coroutine function (``async def``); it is
    called at once, then every ``interval`` seconds. An ``AssertionError`` it raises
    counts as "not yet", so a predicate may assert what it expects, and the last such
    error is the cause of the one raised on timeout; any other exception propagates at
    once. An async predicate that is still running when the time is up is cancelled.
    The timeout is real (event-loop) time, never a ``FakeClock``.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError("timeout must be >= 0 and interval > 0")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    checks = 0
    last: AssertionError | None = None
    while True:
        checks += 1
        bound = asyncio.timeout_at(deadline)
        try:
            async with bound:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
        except AssertionError as exc:
            last, result = exc, False
        except TimeoutError:
            if not bound.expired():  # the predicate's own TimeoutError, not ours
                raise
            break
        if result:
            return
        if loop.time() >= deadline:
            break
        await asyncio.sleep(min(interval, max(deadline - loop.time(), 0.0)))
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    detail = f": {last}" if last is not None and str(last) else ""
    raise AssertionError(
        f"{name} still false after {timeout:g} s ({checks} checks){detail}"
    ) from last
