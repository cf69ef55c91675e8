from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypedDict

import pytest

import taskd

from .redis_server import RedisServer


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


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Await until ``check()`` is true: how tests wait for a state change that has no
    event of its own to await (a subscriber registered, a poll parked), reading the
    tracker's ``stats()`` or ``/metrics`` rather than sleeping for a guessed time."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - polling an observable, bounded
            await asyncio.sleep(0.01)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suites in tests/stress and tests/model are stress suites: CI runs them all;
    the fast loop skips them with ``python -m pytest -m "not stress"``."""
    for item in items:
        parts = item.path.parts
        if "stress" in parts or "model" in parts:
            item.add_marker(pytest.mark.stress)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; each test takes its own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class Engine(TypedDict, total=False):
    """The options that choose an engine (``Tracker`` and ``create_app`` take both)."""

    redis: str
    redis_prefix: str


@pytest.fixture(params=["memory", "redis"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Options that pick the engine (``Tracker`` and ``create_app`` take them): in
    memory, or a shared task space on a real Redis under a fresh prefix."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis": server.url, "redis_prefix": f"test-{uuid.uuid4().hex[:12]}:"}
