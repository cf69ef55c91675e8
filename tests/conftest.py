from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypedDict

import pytest

import taskd
from taskd.testing import FakeClock

from .clients import CLIENTS, MakeClient
from .redis_server import RedisClusterServers, RedisServer


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One real Redis Cluster for the session (3 masters, a replica each); each test
    takes its own key prefix."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


class Engine(TypedDict, total=False):
    """The options that choose an engine (``Tracker`` and ``create_app`` take them)."""

    redis: str
    redis_cluster: str
    redis_prefix: str


@pytest.fixture(params=["memory", "redis", "cluster"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Options that pick the engine (``Tracker`` and ``create_app`` take them): in
    memory, a shared task space on a real Redis under a fresh prefix, or the same on
    a real 3-master Redis Cluster (sharded by owner)."""
    return _engine(request, request.param)


def _engine(request: pytest.FixtureRequest, kind: str) -> Engine:
    if kind == "memory":
        return {}
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    if kind == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return {"redis_cluster": cluster.url, "redis_prefix": prefix}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis": server.url, "redis_prefix": prefix}


#: How the HTTP and push suites are served: aiohttp on each engine, and the ASGI
#: application (``taskd.asgi``) under a real uvicorn (docs/asgi.md).
STACKS = ("memory", "redis", "cluster", "asgi")


@pytest.fixture(params=STACKS)
async def serve(
    request: pytest.FixtureRequest, aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Serve ``create_app``'s options (the stack's engine added) and return a client
    of it: aiohttp's ``TestClient``, or an ``AsgiClient`` of ``taskd.asgi.app`` under
    uvicorn, with the same methods."""
    import taskd.asgi
    import taskd.web

    from .asgi_server import AsgiClient

    kind: str = request.param
    # (the ASGI adapter is the same whatever the engine: served on memory)
    engine = _engine(request, "memory" if kind == "asgi" else kind)
    started: list[AsgiClient] = []

    async def make(**options: Any) -> Any:
        opts = {**engine, **options}
        if not kind.startswith("asgi"):
            return await aiohttp_client(taskd.web.create_app(**opts))
        client = await AsgiClient(taskd.asgi.app(**opts)).start()
        started.append(client)
        return client

    yield make
    for client in started:
        await client.close()


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> MakeClient:
    """Each Python client (``TaskdClient``, and ``SyncTaskdClient`` awaited through
    threads): the client tests run on both (docs/sync.md)."""
    return CLIENTS[request.param]
