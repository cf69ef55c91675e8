from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import taskd


class FakeClock:
    """A wall clock the test moves by hand; the actor reads it on every batch."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def tracker() -> AsyncIterator[taskd.Tracker]:
    async with taskd.Tracker(close_timeout=0.5) as t:
        yield t
