"""A task space on a real Redis Cluster (docs/scale-out.md, "Redis Cluster"): sharded
by owner, an admin sees every owner, an owner's event stream resumes exactly, and a
master fails over under load with nothing acknowledged lost.

The HTTP, push and Redis suites run on the cluster too (the ``engine`` and
``shared`` fixtures); these are what only a cluster has."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import taskd
import taskd.web
from taskd.client import TaskdClient
from taskd.engine.redis import keys
from taskd.testing import eventually

from .redis_server import RedisClusterServers

Client = TestClient[web.Request, web.Application]
API = "/api/v1"
TOKENS = {f"token-{i}": f"user{i}" for i in range(6)}


def prefix() -> str:
    return f"cl-{uuid.uuid4().hex[:10]}:"


def bearer(request: web.Request) -> str:
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    owner = TOKENS.get(token)
    if owner is None:
        raise web.HTTPUnauthorized()
    return owner


async def test_each_owner_lives_in_its_own_slot_and_an_admin_sees_every_owner(
    redis_cluster: RedisClusterServers,
) -> None:
    space = prefix()
    opts: dict[str, Any] = {"redis_cluster": redis_cluster.url, "redis_prefix": space}
    owners: list[str | None] = [*TOKENS.values(), None]
    async with taskd.Tracker(**opts) as a, taskd.Tracker(**opts) as b:
        made: dict[str, str | None] = {}
        for owner in owners:
            for _ in range(3):
                made[(await a.create("export", owner=owner)).task_id] = owner
        # Keys hash by owner: each owner's record under {prefix + owner}, on the
        # master of that tag's slot; the owners spread over more than one master.
        masters = set()
        for tid, owner in made.items():
            tag = "{" + space + (owner or "") + "}" if owner else "{" + space + "}"
            node = redis_cluster.master_of(tag)
            masters.add(node.port)
            assert node.command("EXISTS", tag + keys.RECORD + tid).startswith(b":1")
        assert len(masters) > 1
        # An admin reads any task by id from another process; an owner only its own.
        for tid, owner in made.items():
            rec = await b.get(tid)
            assert rec is not None and rec.owner == owner
            other = "user0" if owner != "user0" else "user1"
            assert await b.get(tid, owner=other) is None
        # An admin's listing merges the shards, newest first, exact across pages.
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page = await b.list_page(limit=4, cursor=cursor)
            seen.extend(r.task_id for r in page.records)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == sorted(made, reverse=True)
        # An owner's listing is its shard alone.
        mine = await b.list(owner="user3")
        assert sorted(r.task_id for r in mine) == sorted(t for t, o in made.items() if o == "user3")
        # Stats add the shards up.
        done = next(t for t, o in made.items() if o == "user4")
        await b.start(done)
        await b.complete(done, {"ok": True})
        stats = await a.stats()
        assert stats["records"] == len(made)
        assert stats["active"] == len(made) - 1
        assert stats["finished"].finished[("export", "completed")] == 1


async def test_a_spawned_task_in_an_owners_shard_is_cancelled_from_another_process(
    redis_cluster: RedisClusterServers,
) -> None:
    opts: dict[str, Any] = {"redis_cluster": redis_cluster.url, "redis_prefix": prefix()}
    started = asyncio.Event()
    unwound = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            unwound.set()

    async with taskd.Tracker(**opts) as a, taskd.Tracker(**opts) as b:
        handle = await a.spawn(work(), task_type="job", owner="user2")
        await started.wait()
        await b.cancel(handle.task_id)  # an admin, in another process
        await asyncio.wait_for(unwound.wait(), 10)
        rec = await b.wait(handle.task_id, timeout=10)
        assert rec.status is taskd.TaskStatus.CANCELLED


@pytest.fixture
async def tokened(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_cluster: RedisClusterServers
) -> Client:
    app = taskd.web.create_app(
        auth=bearer,
        redis_cluster=redis_cluster.url,
        redis_prefix=prefix(),
        sse_ping_interval=0.2,
        close_timeout=0.2,
    )
    return await aiohttp_client(app)


async def test_an_owners_event_stream_resumes_exactly(tokened: Client) -> None:
    base = str(tokened.make_url("")).rstrip("/")
    tracker = taskd.web.get_tracker(tokened.app)
    async with TaskdClient(base, token="token-1") as c, TaskdClient(base, token="token-2") as d:

        async def subscribed() -> bool:
            return (await tracker.stats())["subscriptions"] == 1

        stream = c.events()
        first: list[taskd.TaskRecord] = []

        async def read(n: int) -> None:
            async for rec in stream:
                first.append(rec)
                if len(first) == n:
                    return

        reader = asyncio.ensure_future(read(2))
        await eventually(subscribed)
        a = await c.create("job")
        await d.create("job")  # another owner's: not in this stream
        await c.start(a.task_id)
        await asyncio.wait_for(reader, 10)
        last = c.last_event_id
        assert last is not None
        assert [(r.task_id, r.status.value) for r in first] == [
            (a.task_id, "pending"),
            (a.task_id, "running"),
        ]
        # changes while disconnected, some of another owner's between them
        await c.progress(a.task_id, 0.5)
        await d.create("job")
        b = await c.create("job")
        resumed: list[taskd.TaskRecord] = []
        async for rec in c.events(last_event_id=last):
            resumed.append(rec)
            if len(resumed) == 2:
                break
        assert [(r.task_id, r.status.value, r.progress) for r in resumed] == [
            (a.task_id, "running", 0.5),
            (b.task_id, "pending", None),
        ]


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own: it kills one of its masters."""
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


async def _load(
    tracker: taskd.Tracker,
    owner: str,
    acked: dict[str, str],
    refused: list[BaseException],
    stop: asyncio.Event,
) -> None:
    """Create and complete tasks until told to stop: what each call acknowledged is
    kept (``acked``: id → status), what it refused counted."""
    while not stop.is_set():
        try:
            rec = await tracker.create("load", owner=owner)
            acked[rec.task_id] = "pending"
            await tracker.start(rec.task_id)
            acked[rec.task_id] = "running"
            await tracker.complete(rec.task_id, {"n": len(acked)})
            acked[rec.task_id] = "completed"
        except taskd.StoreError as exc:
            refused.append(exc)
            await asyncio.sleep(0.02)  # (a client's back-off before it retries)


async def test_a_master_fails_over_under_load_and_nothing_acknowledged_is_lost(
    own_cluster: RedisClusterServers,
) -> None:
    space = prefix()
    owners = list(TOKENS.values())
    victim = own_cluster.master_of("{" + space + owners[0] + "}")
    async with taskd.Tracker(redis_cluster=own_cluster.url, redis_prefix=space) as t:
        acked: dict[str, dict[str, str]] = {o: {} for o in owners}
        refused: dict[str, list[BaseException]] = {o: [] for o in owners}
        stop = asyncio.Event()
        loads = [asyncio.ensure_future(_load(t, o, acked[o], refused[o], stop)) for o in owners]
        try:
            await eventually(lambda: all(len(a) >= 20 for a in acked.values()), 30)
            # writes are acknowledged only once a replica has them (WAIT 1)
            await eventually(
                lambda: b"cmdstat_wait:calls=" in victim.command("INFO", "commandstats"), 10
            )
            assert victim.proc is not None
            victim.stop(signal.SIGKILL)  # no goodbye: its replica takes over
            before = len(acked[owners[0]])
            # 503s while the replica is elected, then the same shard serves again,
            # with no restart of anything
            await eventually(lambda: bool(refused[owners[0]]), 30)
            await eventually(lambda: len(acked[owners[0]]) >= before + 20, 60)
        finally:
            stop.set()
            await asyncio.gather(*loads)
        assert all(isinstance(e, taskd.StoreError) for r in refused.values() for e in r)
        # Every acknowledged write is there, at least as far as it was acknowledged.
        order = ["pending", "running", "completed"]
        for owner in owners:
            for tid, status in acked[owner].items():
                rec = await t.get(tid)
                assert rec is not None, (owner, tid)
                assert order.index(rec.status.value) >= order.index(status), (tid, rec.status)


async def test_one_redis_and_a_cluster_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        taskd.Tracker(redis="redis://127.0.0.1:1/0", redis_cluster="redis://127.0.0.1:2")
    with pytest.raises(ValueError, match="exclusive"):
        taskd.Tracker(store=taskd.MemoryStore(), redis_cluster="redis://127.0.0.1:2")
    with pytest.raises(ValueError):
        taskd.Tracker(redis_cluster="http://127.0.0.1:2")


def test_cluster_flags_are_checked(tmp_path: Path, redis_cluster: RedisClusterServers) -> None:
    """docs/cli.md: ``--redis-cluster`` excludes ``--redis`` and ``--db``, takes a TCP
    URL, and an unreachable node is one line naming the flag."""
    from .service import cli, free_port

    port = str(free_port())
    out = cli("serve", "--redis-cluster", redis_cluster.url, "--redis", "redis://127.0.0.1:1/0")
    assert out.returncode == 1 and "exclusive" in out.stderr
    db = str(tmp_path / "x.db")
    out = cli("serve", "--redis-cluster", redis_cluster.url, "--db", db, "--port", port)
    assert out.returncode == 1 and "exclusive" in out.stderr
    out = cli("serve", "--redis-cluster", "unix:///tmp/x.sock", "--port", port)
    assert out.returncode == 1 and "--redis-cluster" in out.stderr
    out = cli("serve", "--redis-cluster", f"redis://127.0.0.1:{free_port()}", "--port", port)
    assert out.returncode == 1 and "--redis-cluster (env TASKD_REDIS_CLUSTER)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_workers_share_one_port_on_a_cluster(
    tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    """``--workers 2`` with ``--redis-cluster`` (from its environment variable):
    tasks of several owners, each created through a fresh connection, are read back
    through another, whichever worker answers."""
    import aiohttp

    from .service import Service

    tokens = [f"{owner}={token}" for token, owner in TOKENS.items()]
    s = Service(
        tmp_path,
        "--redis-prefix",
        prefix(),
        "--workers",
        "2",
        *(arg for t in tokens for arg in ("--token", t)),
        env={"TASKD_REDIS_CLUSTER": redis_cluster.url},
    )
    async with s:
        made: list[tuple[str, str]] = []
        for i in range(12):
            token = f"token-{i % len(TOKENS)}"
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(headers=headers) as fresh:
                resp = await fresh.post(f"{s.url}{API}/tasks", json={"task_type": "w"})
                assert resp.status == 201, await resp.text()
                made.append((token, (await resp.json())["result"]["task_id"]))
        for token, tid in made:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as fresh:
                resp = await fresh.get(f"{s.url}{API}/tasks/{tid}")
                assert resp.status == 200, await resp.text()
                other = "token-0" if token != "token-0" else "token-1"
                resp = await fresh.get(
                    f"{s.url}{API}/tasks/{tid}", headers={"Authorization": f"Bearer {other}"}
                )
                assert resp.status == 404  # another owner's task is not there for it
        assert s.stop() == 0
        assert "warn" not in s.log().lower(), s.log()
