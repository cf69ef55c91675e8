from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TypedDict

import pytest

import taskd
from taskd.testing import FakeClock

from .redis_server import RedisServer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def tracker() -> AsyncIterator[taskd.Tracker]:
    async with taskd.Tracker(close_timeout=0.5) as t:
        yield t


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
