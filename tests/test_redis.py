"""One task space for many processes (docs/scale-out.md): real ``taskd serve --redis``
processes, and workers embedding taskd (``tests/redis_worker.py``), on a real
``redis-server`` started by the test session."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

import taskd
from taskd.testing import FakeClock, eventually

from .conftest import Engine
from .redis_server import RedisClusterServers, RedisServer
from .service import Service, free_port

API = "/api/v1"


def prefix() -> str:
    return f"mp-{uuid.uuid4().hex[:10]}:"


def total(text: str, name: str) -> float:
    """The sum of a family's samples in a /metrics text: with Redis, a per-process
    family has one series per process, labelled ``process`` (docs/operations.md)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def start_all(services: list[Service]) -> list[Service]:
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in services))
    return services


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Shared:
    """Where the task space lives: one Redis, or a 3-master Redis Cluster (with a
    replica each); ``node`` is the server that holds a key, for raw commands."""

    def __init__(self, server: RedisServer | None, cluster: RedisClusterServers | None) -> None:
        self.server = server
        self.cluster = cluster

    @property
    def flags(self) -> tuple[str, str]:
        if self.cluster is not None:
            return ("--redis-cluster", self.cluster.url)
        assert self.server is not None
        return ("--redis", self.server.url)

    def node(self, key: str) -> RedisServer:
        if self.cluster is not None:
            return self.cluster.master_of(key)
        assert self.server is not None
        return self.server

    def masters(self) -> list[RedisServer]:
        if self.cluster is not None:
            return [n for n in self.cluster.nodes if n.proc is not None]
        assert self.server is not None
        return [self.server]


@pytest.fixture(params=["redis", "cluster"])
def shared(request: pytest.FixtureRequest) -> Shared:
    """The suites below run on one Redis and on a Redis Cluster (docs/scale-out.md)."""
    if request.param == "cluster":
        return Shared(None, request.getfixturevalue("redis_cluster"))
    return Shared(request.getfixturevalue("redis_server"), None)


@pytest.fixture
async def trio(
    tmp_path: Path, shared: Shared
) -> AsyncIterator[Callable[..., Awaitable[list[Service]]]]:
    """Start N ``taskd serve --redis`` (or ``--redis-cluster``) processes on one
    prefix (extra flags allowed)."""
    started: list[Service] = []

    async def make(n: int = 3, *flags: str, space: str | None = None) -> list[Service]:
        space = space or prefix()
        services = [
            Service(tmp_path, *shared.flags, "--redis-prefix", space, *flags) for _ in range(n)
        ]
        started.extend(services)
        return await start_all(services)

    yield make
    await asyncio.gather(*(asyncio.to_thread(s.__exit__, None, None, None) for s in started))


class Worker:
    """``tests/redis_worker.py``: taskd embedded in an aiohttp app, spawning in-process."""

    def __init__(self, tmp: Path, url: str, space: str, *mode: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"worker-{self.port}.log"
        self.argv = [sys.executable, "-m", "tests.redis_worker", str(self.port), url, space, *mode]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                import urllib.request

                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("worker did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def worker(
    tmp_path: Path, shared: Shared
) -> AsyncIterator[Callable[[str], Awaitable[Worker]]]:
    started: list[Worker] = []

    async def make(space: str) -> Worker:
        mode = ("cluster",) if shared.cluster is not None else ()
        w = Worker(tmp_path, shared.flags[1], space, *mode)
        started.append(w)
        return await asyncio.to_thread(w.start)

    yield make
    for w in started:
        w.stop()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, status: int | None = None, **kw: Any
) -> Any:
    async with http.request(method, url, **kw) as resp:
        body = None if resp.status == 204 else await resp.json()
        if status is not None:
            assert resp.status == status, body
        return body


async def record(http: aiohttp.ClientSession, base: str, tid: str) -> dict[str, Any]:
    body = await call(http, "GET", f"{base}{API}/tasks/{tid}", 200)
    result: dict[str, Any] = body["result"]
    return result


# --- one task space -------------------------------------------------------------------


async def test_read_your_writes_across_processes(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b, c = await trio(3)
    created = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "job"})
    tid = created["result"]["task_id"]
    assert (await record(http, b.url, tid))["status"] == "pending"
    await call(http, "POST", f"{b.url}{API}/tasks/{tid}/start", 200)
    await call(http, "POST", f"{c.url}{API}/tasks/{tid}/progress", 200, json={"progress": 0.5})
    assert (await record(http, a.url, tid))["progress"] == 0.5
    await call(http, "POST", f"{a.url}{API}/tasks/{tid}/complete", 200, json={"result": [1]})
    for s in (a, b, c):
        rec = await record(http, s.url, tid)
        assert (rec["status"], rec["result"]) == ("completed", [1])
    await call(http, "DELETE", f"{c.url}{API}/tasks/{tid}", 204)
    for s in (a, b):
        await call(http, "GET", f"{s.url}{API}/tasks/{tid}", 404)


async def test_dedup_is_atomic_across_processes(trio: Any, http: aiohttp.ClientSession) -> None:
    services = await trio(3)
    body = {"task_type": "commit", "resource_id": "s1"}

    async def one(i: int) -> tuple[int, dict[str, Any]]:
        url = f"{services[i % 3].url}{API}/tasks"
        async with http.post(url, json=body) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(one(i) for i in range(60)))
    created = [b for s, b in answers if s == 201]
    conflicts = [b for s, b in answers if s == 409]
    assert len(created) == 1 and len(conflicts) == 59
    holder = created[0]["result"]["task_id"]
    assert all(c["error"]["code"] == "CONFLICT" for c in conflicts)
    assert all(c["error"]["details"]["task_id"] == holder for c in conflicts)


async def test_quota_is_global(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b = await trio(2, "--token", "alice=tok-a", "--max-active-per-owner", "2")
    auth = {"Authorization": "Bearer tok-a"}
    for s in (a, b):
        await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"}, headers=auth)
    body = await call(
        http, "POST", f"{a.url}{API}/tasks", 429, json={"task_type": "x"}, headers=auth
    )
    assert body["error"]["code"] == "RESOURCE_EXHAUSTED"


async def test_cap_and_ttl_are_global(redis_server: RedisServer) -> None:
    """Two trackers (two actors, two connections) on one prefix: the cap evicts the
    oldest finished task whichever process made it, and TTL expiry by either removes
    it for both."""
    space = prefix()
    clock_now = [1_800_000_000.0]
    retention = taskd.Retention(max_tasks=3, completed_ttl=10.0)
    opts: dict[str, Any] = {"redis": redis_server.url, "redis_prefix": space}
    async with (
        taskd.Tracker(retention=retention, clock=lambda: clock_now[0], **opts) as one,
        taskd.Tracker(retention=retention, clock=lambda: clock_now[0], **opts) as two,
    ):
        old = await one.create("x")
        await one.start(old.task_id)
        await two.complete(old.task_id)
        mid = await two.create("x")
        await two.create("x")
        newest = await one.create("x")  # full: the finished one is evicted
        assert await two.get(old.task_id) is None
        assert (await one.stats())["records"] == 3
        await one.start(mid.task_id)
        await one.complete(mid.task_id)
        clock_now[0] += 11
        await two.get(newest.task_id)  # any command of either sweeps what is due
        assert await one.get(mid.task_id) is None
        assert (await two.stats())["records"] == 2
        await two.create("x")
        with pytest.raises(taskd.TrackerFull):
            await one.create("x")  # three active tasks hold every slot


async def test_lists_and_page_tokens_are_global(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b, c = await trio(3)
    made = []
    for i in range(10):
        s = (a, b)[i % 2]
        body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "t"})
        made.append(body["result"]["task_id"])
    seen: list[str] = []
    page = await call(http, "GET", f"{c.url}{API}/tasks?limit=3", 200)
    seen += [r["task_id"] for r in page["result"]]
    servers = [a, b, c]
    n = 0
    while page.get("next_page_token"):
        s = servers[n % 3]
        n += 1
        page = await call(
            http, "GET", f"{s.url}{API}/tasks?limit=3&page_token={page['next_page_token']}", 200
        )
        seen += [r["task_id"] for r in page["result"]]
    assert seen == made[::-1]


async def test_long_poll_on_one_process_sees_another(
    trio: Any, http: aiohttp.ClientSession
) -> None:
    """A long-poll parked on one process is answered when another process ends the
    task, not at its 30 s deadline (how soon: ``python bench/redis.py``)."""
    a, b = await trio(2)
    for _ in range(5):
        body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
        tid = body["result"]["task_id"]
        poll = asyncio.ensure_future(call(http, "GET", f"{b.url}{API}/tasks/{tid}?wait=30", 200))

        async def parked(url: str = b.url) -> bool:
            async with http.get(f"{url}/metrics") as resp:
                return total(await resp.text(), "taskd_waiters") == 1

        await eventually(parked, 15)
        await call(http, "POST", f"{a.url}{API}/tasks/{tid}/cancel", 202)
        answer = await asyncio.wait_for(poll, 10)  # woken: far before the deadline
        assert answer["result"]["status"] == "cancelled"


async def test_a_process_follows_only_the_tasks_it_holds(
    trio: Any, http: aiohttp.ClientSession, shared: Shared
) -> None:
    """docs/scale-out.md ("Streams and pub/sub"): a process follows a task's notes
    channel while it holds a waiter of that task, and leaves it once answered; the
    process that made the task does not follow it."""
    from taskd.engine.redis import keys

    space = prefix()
    a, b = await trio(2, space=space)
    body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
    tid = body["result"]["task_id"]
    channel = "{" + space + "}" + keys.TASK_NOTES + tid

    def followers() -> int:
        reply = shared.node(channel).command("PUBSUB", "SHARDNUMSUB", channel)  # *2 … :n
        return int(reply.split()[-1].lstrip(b":"))

    assert followers() == 0
    poll = asyncio.ensure_future(call(http, "GET", f"{b.url}{API}/tasks/{tid}?wait=30", 200))

    async def parked() -> bool:
        async with http.get(f"{b.url}/metrics") as resp:
            return total(await resp.text(), "taskd_waiters") == 1

    await eventually(parked, 15)
    assert followers() == 1  # b alone
    await call(http, "POST", f"{a.url}{API}/tasks/{tid}/cancel", 202)
    assert (await asyncio.wait_for(poll, 10))["result"]["status"] == "cancelled"
    await eventually(lambda: followers() == 0, 10)


async def test_a_waiter_is_answered_across_a_lost_notes_connection(
    trio: Any, http: aiohttp.ClientSession, shared: Shared
) -> None:
    """docs/scale-out.md: a note sent while a process's pub/sub connection is down is
    gone; after the reconnect the process reads its waiters' records again. The
    connections are killed, and the task ended at once, while they are down."""
    a, b = await trio(2)
    body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
    tid = body["result"]["task_id"]
    poll = asyncio.ensure_future(call(http, "GET", f"{b.url}{API}/tasks/{tid}?wait=30", 200))

    async def parked() -> bool:
        async with http.get(f"{b.url}/metrics") as resp:
            return total(await resp.text(), "taskd_waiters") == 1

    await eventually(parked, 15)
    for node in shared.masters():
        node.command("CLIENT", "KILL", "TYPE", "pubsub")
    await call(http, "POST", f"{a.url}{API}/tasks/{tid}/cancel", 202)
    answer = await asyncio.wait_for(poll, 15)  # far before the 30 s deadline
    assert answer["result"]["status"] == "cancelled"
    await eventually(lambda: "the change notes cannot be read" in b.log(), 10)
    # and the process follows notes again: the next long-poll is woken too
    body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
    tid = body["result"]["task_id"]
    poll = asyncio.ensure_future(call(http, "GET", f"{b.url}{API}/tasks/{tid}?wait=30", 200))
    await eventually(parked, 15)
    await call(http, "POST", f"{a.url}{API}/tasks/{tid}/cancel", 202)
    assert (await asyncio.wait_for(poll, 10))["result"]["status"] == "cancelled"


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    event_id = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:") and event_id is not None:
            out.append((event_id, json.loads(line[5:])))
            event_id = None
            if len(out) == n:
                return out
    return out


async def test_event_streams_are_global_and_resumable(
    trio: Any, http: aiohttp.ClientSession
) -> None:
    a, b, c = await trio(3)

    async def subscribed(url: str) -> bool:
        async with http.get(f"{url}/metrics") as resp:
            return total(await resp.text(), "taskd_subscriptions") == 1

    async with http.get(f"{a.url}{API}/events") as stream:
        await eventually(lambda: subscribed(a.url), 15)
        ids = []
        for s in (b, c, b):
            body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "e"})
            ids.append(body["result"]["task_id"])
        events = await asyncio.wait_for(read_events(stream, 3), 5)
    assert [e[1]["task_id"] for e in events] == ids
    seqs = [e[0] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # Resume on another process from the first event: the two after it are replayed.
    headers = {"Last-Event-ID": str(seqs[0])}
    async with http.get(f"{c.url}{API}/events", headers=headers) as stream:
        replay = await asyncio.wait_for(read_events(stream, 2), 5)
    assert [e[0] for e in replay] == seqs[1:]


async def test_the_stream_is_read_again_for_each_new_event_stream(
    trio: Any, http: aiohttp.ClientSession
) -> None:
    """docs/scale-out.md: a process reads the change stream only while an event
    stream there follows every task; one opened after the last one closed is fed
    again, from its own start."""
    a, b = await trio(2)

    async def subscriptions(n: int) -> bool:
        async with http.get(f"{b.url}/metrics") as resp:
            return total(await resp.text(), "taskd_subscriptions") == n

    last = 0
    for _ in range(2):
        async with http.get(f"{b.url}{API}/events") as stream:
            await eventually(lambda: subscriptions(1), 15)
            body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "e"})
            [(seq, event)] = await asyncio.wait_for(read_events(stream, 1), 5)
            assert event["task_id"] == body["result"]["task_id"] and seq > last
            last = seq

        async def gone() -> bool:
            # the server learns that a client left when it next writes to it
            await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "e"})
            return await subscriptions(0)

        await eventually(gone, 15)


async def test_cancel_reaches_the_process_running_the_coroutine(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tid = (await call(http, "POST", f"{w.url}/spawn?seconds=60"))["task_id"]
    assert (await record(http, b.url, tid))["status"] == "running"
    body = await call(http, "POST", f"{b.url}{API}/tasks/{tid}/cancel", 202)
    assert body["result"]["status"] in ("cancelling", "cancelled")

    async def cancelled() -> bool:
        return (await record(http, b.url, tid))["status"] == "cancelled"

    await eventually(cancelled, 5)  # the worker's coroutine unwound and reported it


async def test_a_killed_process_leaves_nothing_looking_alive(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tids = [(await call(http, "POST", f"{w.url}/spawn?seconds=60"))["task_id"] for _ in range(3)]
    assert w.proc is not None
    w.proc.kill()
    killed_at = time.monotonic()

    async def lost() -> bool:
        recs = [await record(http, b.url, t) for t in tids]
        return all(r["status"] == "failed" for r in recs)

    await eventually(lost, 12)
    assert time.monotonic() - killed_at < 10
    for t in tids:
        assert (await record(http, b.url, t))["error"] == "interrupted: process lost"


async def test_a_paused_process_cannot_write_a_stale_outcome(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tid = (await call(http, "POST", f"{w.url}/spawn?seconds=2"))["task_id"]
    assert w.proc is not None
    w.proc.send_signal(signal.SIGSTOP)

    async def lost() -> bool:
        return (await record(http, b.url, tid))["status"] == "failed"

    await eventually(lost, 15)
    w.proc.send_signal(signal.SIGCONT)

    async def settled() -> bool:
        return (await call(http, "GET", f"{w.url}/runners"))["runners"] == 0

    await eventually(settled, 10)  # its coroutine ended (or was stopped) after the pause
    rec = await record(http, b.url, tid)
    assert (rec["status"], rec["error"]) == ("failed", "interrupted: process lost")


async def test_heartbeat_timeout_fires_once(
    trio: Any, http: aiohttp.ClientSession, shared: Shared
) -> None:
    space = prefix()
    a, b, c = await trio(3, space=space)
    body = await call(
        http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "hb", "heartbeat_timeout": 1}
    )
    tid = body["result"]["task_id"]

    async def failed() -> bool:
        return (await record(http, c.url, tid))["status"] == "failed"

    await eventually(failed, 10)
    node = shared.node("{" + space + "}x")
    entries = node.command("XRANGE", "{" + space + "}x", "-", "+").decode()
    assert entries.count(f'"id":"{tid}"') == 2  # created, then failed once: not twice
    assert (await record(http, b.url, tid))["error"] == "heartbeat timeout"
    assert node.command("ZSCORE", "{" + space + "}hb", tid).startswith(b"$-1")


async def test_each_webhook_is_delivered_by_some_process(
    tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    calls: list[tuple[str, bytes]] = []
    app = web.Application()

    async def hook(request: web.Request) -> web.Response:
        calls.append((request.headers["webhook-id"], await request.read()))
        return web.Response(status=204)

    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        space = prefix()
        flags = (
            "--redis", redis_server.url, "--redis-prefix", space,
            "--webhook-secret", "whsec_" + "QUJDREVGR0hJSktMTU5PUA==",
            "--webhook-allow", f"127.0.0.1:{server.port}",
        )  # fmt: skip
        a, b = await start_all([Service(tmp_path, *flags), Service(tmp_path, *flags)])
        try:
            url = f"http://127.0.0.1:{server.port}/hook"
            tids = []
            for i in range(6):
                s = (a, b)[i % 2]
                body = await call(
                    http, "POST", f"{s.url}{API}/tasks", 201,
                    json={"task_type": "w", "callback_url": url},
                )  # fmt: skip
                tids.append(body["result"]["task_id"])
                await call(http, "POST", f"{(b, a)[i % 2].url}{API}/tasks/{tids[-1]}/cancel", 202)

            async def delivered() -> bool:
                return {json.loads(body)["task_id"] for _, body in calls} == set(tids)

            await eventually(delivered, 15)
            by_task: dict[str, set[str]] = {}
            for wid, body in calls:
                by_task.setdefault(json.loads(body)["task_id"], set()).add(wid)
            assert all(len(ids) == 1 for ids in by_task.values())  # duplicates share an id
        finally:
            for s in (a, b):
                await asyncio.to_thread(s.__exit__, None, None, None)
    finally:
        await server.close()


# --- Redis away -----------------------------------------------------------------------


async def test_redis_stalled_then_back(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    redis = RedisServer(tmp_path / "r").start()
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
            tid = body["result"]["task_id"]
            redis.pause()
            started = time.monotonic()
            # A long-poll first: it waits for its task's notes channel, which a
            # stalled Redis never confirms; 503 as for any command, not a hang.
            async with http.get(f"{s.url}{API}/tasks/{tid}?wait=30") as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            # (bounds: a batch in flight when Redis stalled takes its 2 s read
            # timeout, then the hold or the next batch its own 2 s, plus scheduling)
            assert time.monotonic() - started < 7
            started = time.monotonic()
            async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            assert time.monotonic() - started < 7
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 503
            async with http.get(f"{s.url}/health") as resp:
                assert resp.status == 503
            redis.resume()
            back = time.monotonic()

            async def recovered() -> bool:
                async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                    return resp.status == 200

            await eventually(recovered, 10)
            assert time.monotonic() - back < 5
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
    finally:
        redis.stop()


async def test_acknowledged_changes_survive_a_redis_restart(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    flags = ("--appendonly", "yes", "--appendfsync", "always")
    redis = RedisServer(tmp_path / "r", *flags).start()
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            tids = []
            for _ in range(20):
                body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
                tids.append(body["result"]["task_id"])
            await call(http, "POST", f"{s.url}{API}/tasks/{tids[0]}/cancel", 202)
            redis.stop(signal.SIGKILL)
            async with http.get(f"{s.url}{API}/tasks/{tids[0]}") as resp:
                assert resp.status == 503
            redis = RedisServer(tmp_path / "r", *flags, port=redis.port).start()

            async def recovered() -> bool:
                async with http.get(f"{s.url}{API}/tasks/{tids[0]}") as resp:
                    return resp.status == 200

            await eventually(recovered, 10)
            assert (await record(http, s.url, tids[0]))["status"] == "cancelled"
            page = await call(http, "GET", f"{s.url}{API}/tasks?limit=100", 200)
            assert {r["task_id"] for r in page["result"]} == set(tids)
    finally:
        redis.stop()


# --- --workers and flags ----------------------------------------------------------------


async def test_workers_share_one_port_and_one_space(
    tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    s = Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", prefix(), "--workers", "2")
    async with s:
        assert s.proc is not None

        pid = s.proc.pid

        def children() -> list[str]:
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
            return out.stdout.split()

        async def two() -> bool:
            return len(children()) == 2

        await eventually(two, 15)
        tids = []
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh:  # new connection each time
                body = await call(
                    fresh, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "w"}
                )
                tids.append(body["result"]["task_id"])
                await record(fresh, s.url, tids[-1])  # visible whichever worker answers
        pids = children()
        assert s.stop() == 0
        # No library warning at start or stop (redis-py warns on a synchronous Retry).
        assert "warn" not in s.log().lower(), s.log()
    gone = await asyncio.to_thread(
        subprocess.run, ["ps", "-o", "stat=", "-p", ",".join(pids)], capture_output=True
    )
    assert all(st.startswith(b"Z") for st in gone.stdout.split())  # exited (or reaped)


def test_redis_flags_are_checked(tmp_path: Path) -> None:
    from .service import cli

    out = cli("serve", "--db", str(tmp_path / "x.db"), "--redis", "redis://127.0.0.1:1/0")
    assert out.returncode == 1 and "exclusive" in out.stderr
    out = cli("serve", "--workers", "2", "--port", str(free_port()))
    assert out.returncode == 1 and "--workers needs --redis" in out.stderr
    out = cli("serve", "--redis", "http://x", "--port", str(free_port()))
    assert out.returncode == 1 and "redis://" in out.stderr
    out = cli("serve", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--port", str(free_port()))
    assert out.returncode == 1 and "cannot be reached" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # that line alone


def test_python_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        taskd.Tracker(store=taskd.MemoryStore(), redis="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="redis://"):
        taskd.Tracker(redis="localhost:6379")
    with pytest.raises(TypeError):
        taskd.Tracker(redis=6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="braces"):
        taskd.Tracker(redis="redis://127.0.0.1:1/0", redis_prefix="{x}")


# --- under attack and faults (docs/scale-out.md: "Faults and hostile input") -----------

#: The issue's forged token: a lone surrogate as the cursor, under the unkeyed digest of
#: "no filters" that anyone could compute.
FORGED = "eyJjIjoiXHVkODAwIiwiZiI6ImZlNDRhOGNjY2Q4OWVkYWUifQ"


def _token(payload: object) -> str:
    import base64

    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("engine", ["memory", "sqlite", "redis"])
async def test_a_forged_page_token_is_400_and_the_server_keeps_serving(
    engine: str, tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """A page token is signed with the deployment's key: one it did not make is 400
    on every engine, and never reaches the store (it once stopped a --redis worker)."""
    flags = {
        "memory": (),
        "sqlite": ("--db", str(tmp_path / "t.db")),
        "redis": ("--redis", redis_server.url, "--redis-prefix", prefix()),
    }[engine]
    async with Service(tmp_path, *flags) as s:
        for _ in range(3):
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
        page = await call(http, "GET", f"{s.url}{API}/tasks?limit=1", 200)
        good = page["next_page_token"]
        forged = [
            FORGED,
            _token({"c": "\ud800", "m": "0" * 32}),
            _token({"c": 5, "m": "x"}),
            _token(["c", "m"]),
            _token({"c": page["result"][0]["task_id"], "m": "0" * 32}),
            "%%%",
            "\u00e9t\u00e9",
            good[:-2],
            good + "AA",
            "A" * 5000,
        ]
        for token in forged:
            body = await call(http, "GET", f"{s.url}{API}/tasks", 400, params={"page_token": token})
            assert body["error"]["code"] == "INVALID_ARGUMENT"
            assert body["error"]["details"] == {"parameter": "page_token"}
        # The token it made still works, and the server is whole.
        nxt = await call(http, "GET", f"{s.url}{API}/tasks?limit=1&page_token={good}", 200)
        assert len(nxt["result"]) == 1
        await call(http, "GET", f"{s.url}/health", 200)
        await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
        started = time.monotonic()
        assert await asyncio.to_thread(s.stop) == 0
        assert time.monotonic() - started < 10
        assert "Traceback" not in s.log(), s.log()


async def test_page_tokens_of_one_deployment_only(
    redis_server: RedisServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Every process of a deployment accepts its tokens (the key is kept in Redis,
    made once); another deployment (another prefix) refuses them."""
    space = prefix()
    async with (
        Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", space) as a,
        Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", prefix()) as other,
    ):
        for _ in range(3):
            await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
        token = (await call(http, "GET", f"{a.url}{API}/tasks?limit=1", 200))["next_page_token"]
        await call(http, "GET", f"{other.url}{API}/tasks?page_token={token}", 400)
    # A process started after the token was made accepts it too.
    async with Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", space) as b:
        body = await call(http, "GET", f"{b.url}{API}/tasks?limit=1&page_token={token}", 200)
        assert len(body["result"]) == 1


async def test_a_command_redis_py_cannot_send_fails_alone(redis_server: RedisServer) -> None:
    """An exception inside an engine call (here redis-py cannot encode a lone
    surrogate) answers its own caller 503; the rest of the batch is answered, later
    commands work, and the tracker closes promptly."""
    async with (
        asyncio.timeout(10),  # it once hung: the actor died with the batch unanswered
        taskd.Tracker(redis=redis_server.url, redis_prefix=prefix()) as tracker,
    ):
        rec = await tracker.create("x")
        bad_list = tracker.list_page(cursor="\ud800")
        bad_get = tracker.get("\udfff")
        good = tracker.get(rec.task_id)
        results = await asyncio.gather(bad_list, bad_get, good, return_exceptions=True)
        assert isinstance(results[0], taskd.StoreError), results
        assert isinstance(results[1], taskd.StoreError), results
        assert results[2] == rec
        assert tracker.health() is None
        assert (await tracker.list_page()).records == (rec,)
        started = time.monotonic()
    assert time.monotonic() - started < 5


async def test_the_decoder_cache_is_bounded_by_bytes(redis_server: RedisServer) -> None:
    """Large results are not held by count: what the process keeps of the records it
    read stays near the cache's budget (docs/scale-out.md: 32 MiB of record text),
    measured with ``tracemalloc`` (8,192 versions of a 1 MiB result once took a
    worker past 1 GiB). The cache is used: a version read twice is one object."""
    import gc
    import tracemalloc

    mib = 1024 * 1024
    big = "x" * mib
    async with taskd.Tracker(redis=redis_server.url, redis_prefix=prefix()) as tracker:

        async def one(i: int) -> None:
            rec = await tracker.create("big")
            await tracker.start(rec.task_id)
            await tracker.complete(rec.task_id, result={"i": i, "blob": big})
            got = await tracker.get(rec.task_id)
            assert got is not None and got.result == {"i": i, "blob": big}
            await tracker.delete(rec.task_id)

        small = await tracker.create("small")
        got = await tracker.get(small.task_id)
        assert got is not None and await tracker.get(small.task_id) is got  # decoded once
        # A value over 64 bytes turns the hash into Redis's hashtable encoding, whose
        # order moves between reads: the script still sends one text per version.
        medium = await tracker.create("medium")
        await tracker.start(medium.task_id)
        await tracker.complete(medium.task_id, result={"blob": "y" * 1000})
        first = await tracker.get(medium.task_id)
        assert all([await tracker.get(medium.task_id) is first for _ in range(8)])
        await one(-1)  # connections, the script, buffers: before the measure
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(64):  # by count alone: 64 versions of 1 MiB (and their text)
                await one(i)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert held < 48 * mib, f"{held / mib:.1f} MiB held after 64 results of 1 MiB"


def _redis_with(tmp_path: Path, *extra: str) -> RedisServer:
    return RedisServer(tmp_path / f"redis-{uuid.uuid4().hex[:6]}", *extra).start()


async def test_an_evicting_redis_is_refused_at_start(tmp_path: Path) -> None:
    """Under allkeys-lru most acknowledged tasks once silently became 404: taskd
    refuses to start on a Redis whose maxmemory-policy is not noeviction."""
    from .service import cli

    redis = _redis_with(tmp_path, "--maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(taskd.StoreError, match=r"maxmemory-policy allkeys-lru.*noeviction"):
            async with taskd.Tracker(redis=redis.url):
                pass
        out = await asyncio.to_thread(
            cli, "serve", "--redis", redis.url, "--port", str(free_port()), timeout=30
        )
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "maxmemory-policy" in lines[0] and "noeviction" in lines[0]
    finally:
        redis.stop()


async def test_policy_not_checkable_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where CONFIG is not allowed (an ACL, a managed Redis) taskd cannot check the
    policy: one WARNING says so, and it serves."""
    redis = _redis_with(tmp_path)
    try:
        redis.command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-config")
        url = f"redis://app:pw@127.0.0.1:{redis.port}/0"
        with caplog.at_level("WARNING", logger="taskd"):
            async with taskd.Tracker(redis=url, redis_prefix=prefix()) as tracker:
                rec = await tracker.create("x")
                assert await tracker.get(rec.task_id) == rec
        warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
        assert "noeviction" in warnings[0].getMessage()
    finally:
        redis.stop()


async def test_policy_is_checked_again_on_reconnect(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A Redis reconfigured to evict is found when the connection comes back: 503
    and /health 503 naming the setting, until it is noeviction again."""
    redis = _redis_with(tmp_path)
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
            redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
            redis.command("CLIENT", "KILL", "TYPE", "normal")

            async def refused() -> bool:
                # The first call finds the connection closed; the next one connects
                # again, checks the policy and refuses.
                async with http.get(f"{s.url}{API}/tasks") as resp:
                    assert resp.status in (200, 503)
                async with http.get(f"{s.url}/health") as resp:
                    return resp.status == 503 and "maxmemory-policy" in await resp.text()

            await eventually(refused, 10)
            async with http.get(f"{s.url}{API}/tasks") as resp:
                assert resp.status == 503
                assert "noeviction" in (await resp.json())["error"]["message"]
            redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")

            async def back() -> bool:
                async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                    return resp.status == 201

            await eventually(back, 10)
            await call(http, "GET", f"{s.url}/health", 200)
    finally:
        redis.stop()


async def test_a_full_redis_is_visible(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A Redis that refuses writes (full, under noeviction): writes 503 with
    Retry-After, reads go on, /health 503 with the reason, one ERROR line; when it
    takes writes again, one INFO line and all is well."""
    import redis as redis_py

    redis = _redis_with(tmp_path, "--maxmemory", "4mb")
    # The filler stays connected to the end (closing it frees memory in Redis), and is
    # closed on every path (it connects on first use).
    filler = redis_py.Redis(port=redis.port)
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
            tid = body["result"]["task_id"]
            # Large values first, then small ones: a refused large value frees its
            # query buffer, which leaves room for small writes.
            for size in (65536, 512):
                with pytest.raises(redis_py.exceptions.OutOfMemoryError):
                    for i in range(100_000):
                        filler.set(f"fill:{size}:{i}", b"x" * size)
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            await call(http, "GET", f"{s.url}{API}/tasks/{tid}", 200)  # reads go on
            async with http.get(f"{s.url}/health") as resp:
                assert resp.status == 503
                assert "OOM" in await resp.text()
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 503
            redis.command("CONFIG", "SET", "maxmemory", "0")

            async def healthy() -> bool:
                async with http.get(f"{s.url}/health") as resp:
                    return resp.status == 200

            await eventually(healthy, 10)
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
        errors = [line for line in s.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "refuses writes" in errors[0], s.log()
        assert "takes writes again" in s.log()
    finally:
        filler.close()
        redis.stop()


def _everything(redis: RedisServer, space: str) -> bytes:
    """Every byte stored under a deployment's keys (SCAN, then DUMP of each)."""
    import redis as redis_py

    client = redis_py.Redis(port=redis.port)
    try:
        dumps = [client.dump(key) or b"" for key in client.scan_iter(match="{" + space + "}*")]
    finally:
        client.close()
    return b"".join(dumps)


async def test_a_deleted_task_is_gone_from_replays_and_from_redis(
    redis_server: RedisServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """After DELETE, neither a Last-Event-ID replay nor any key of the deployment
    holds the task's result, error, metadata or message."""
    space = prefix()
    async with Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", space) as s:
        async with http.get(f"{s.url}{API}/events") as stream:

            async def subscribed() -> bool:
                async with http.get(f"{s.url}/metrics") as resp:
                    return total(await resp.text(), "taskd_subscriptions") == 1

            await eventually(subscribed, 15)
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "a"})
            since = (await asyncio.wait_for(read_events(stream, 1), 5))[0][0]
        secrets_ = {
            "result": "RESULT-S3CR3T-1",
            "error": "ERROR-S3CR3T-2",
            "meta": "META-S3CR3T-3",
            "msg": "MSG-S3CR3T-4",
        }
        ids = []
        for outcome in ("complete", "fail"):
            body = await call(
                http,
                "POST",
                f"{s.url}{API}/tasks",
                201,
                json={"task_type": "b", "metadata": {"k": secrets_["meta"]}},
            )
            tid = body["result"]["task_id"]
            ids.append(tid)
            await call(http, "POST", f"{s.url}{API}/tasks/{tid}/start", 200)
            await call(
                http,
                "POST",
                f"{s.url}{API}/tasks/{tid}/progress",
                200,
                json={"progress": 0.5, "message": secrets_["msg"]},
            )
            done = (
                {"result": {"v": secrets_["result"]}}
                if outcome == "complete"
                else {"error": secrets_["error"]}
            )
            await call(http, "POST", f"{s.url}{API}/tasks/{tid}/{outcome}", 200, json=done)
        # Before the delete, a replay has them (the payload is read from the record).
        marker = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "m"})
        before = await _replay_text(http, s.url, since, marker["result"]["task_id"])
        assert secrets_["result"] in before and secrets_["meta"] in before
        assert secrets_["error"] in before and secrets_["msg"] in before
        for tid in ids:
            await call(http, "DELETE", f"{s.url}{API}/tasks/{tid}", 204)
        marker = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "m"})
        after = await _replay_text(http, s.url, since, marker["result"]["task_id"])
        assert '"task_type": "b"' not in after
        for value in secrets_.values():
            assert value not in after
        stored = _everything(redis_server, space)
        assert marker["result"]["task_id"].encode() in stored
        for name, value in secrets_.items():
            if name != "msg":  # see docs/scale-out.md: a version's message stays
                assert value.encode() not in stored, name


async def _replay_text(http: aiohttp.ClientSession, url: str, since: int, last: str) -> str:
    """What a client resuming after event ``since`` gets, up to the event of task
    ``last`` (an SSE stream coalesces each task's changes), as text."""
    events: list[dict[str, Any]] = []
    async with http.get(f"{url}{API}/events", headers={"Last-Event-ID": str(since)}) as stream:
        async with asyncio.timeout(5):
            while not events or events[-1]["task_id"] != last:
                got = await read_events(stream, 1)
                assert got, events
                events.append(got[0][1])
    return json.dumps(events)


async def test_a_list_that_matches_nothing_is_bounded(redis_server: RedisServer) -> None:
    """One list call looks at a bounded number of ids: past 1,000 that do not match,
    it answers an empty page with a cursor, and following the cursors finds every
    match (four such lists once took another worker's GET p50 from 2 ms to 100 ms).
    The walk reads the smallest index that covers a filter (docs/scale-out.md): here
    the owner's and the type's are both large, and they share one task."""
    async with taskd.Tracker(
        redis=redis_server.url,
        redis_prefix=prefix(),
        retention=taskd.Retention(max_tasks=20_000),
    ) as tracker:
        lone = await tracker.create("y", owner="alice")  # the oldest, the only match
        n = 1_500
        for owner, task_type in (("alice", "x"), ("bob", "y")):
            await asyncio.gather(*(tracker.create(task_type, owner=owner) for _ in range(n)))
        page = await tracker.list_page(owner="alice", task_type="y", limit=5)
        assert page.records == () and page.next_cursor is not None
        found: list[taskd.TaskRecord] = []
        calls = 1
        while page.next_cursor is not None:
            page = await tracker.list_page(
                owner="alice", task_type="y", limit=5, cursor=page.next_cursor
            )
            found.extend(page.records)
            calls += 1
            assert calls < 20
        assert found == [lone]
        assert calls >= 2  # each call walked at most 1,000 ids
        # Tracker.list follows the cursors itself: the first match, however deep.
        assert await tracker.list(owner="alice", task_type="y", limit=5) == [lone]
        # An owner's index is exact: the one task of no owner at once.
        unowned = await tracker.create("z")
        assert (await tracker.list_page(owner=None, limit=5)).records == (unowned,)
        # A listing that matches keeps its pages: newest first, nothing skipped.
        mine = await tracker.list_page(owner="alice", limit=200)
        assert len(mine.records) == 200
        ids = [r.task_id for r in mine.records]
        assert ids == sorted(ids, reverse=True)


@pytest.mark.parametrize("engine", ["memory", "sqlite", "redis"])
async def test_a_deleted_task_is_not_replayed_on_any_engine(
    engine: str, tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """The same on every engine: a Last-Event-ID replay leaves out a deleted task's
    changes (the in-process replay ring kept them)."""
    flags = {
        "memory": (),
        "sqlite": ("--db", str(tmp_path / "t.db")),
        "redis": ("--redis", redis_server.url, "--redis-prefix", prefix()),
    }[engine]
    async with Service(tmp_path, *flags) as s:
        async with http.get(f"{s.url}{API}/events") as stream:

            async def subscribed() -> bool:
                async with http.get(f"{s.url}/metrics") as resp:
                    return total(await resp.text(), "taskd_subscriptions") == 1

            await eventually(subscribed, 15)
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "a"})
            since = (await asyncio.wait_for(read_events(stream, 1), 5))[0][0]
        body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "b"})
        tid = body["result"]["task_id"]
        await call(http, "POST", f"{s.url}{API}/tasks/{tid}/start", 200)
        done = {"result": "DELETED-S3CR3T"}
        await call(http, "POST", f"{s.url}{API}/tasks/{tid}/complete", 200, json=done)
        await call(http, "DELETE", f"{s.url}{API}/tasks/{tid}", 204)
        kept = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "c"})
        after = await _replay_text(http, s.url, since, kept["result"]["task_id"])
        assert "DELETED-S3CR3T" not in after and tid not in after
        assert json.loads(after)[0]["task_id"] == kept["result"]["task_id"]


def test_the_script_spells_no_key_and_no_entry_field_by_hand() -> None:
    """Every key suffix and stream entry field the library uses (``script.lua``,
    ``trees.lua``, ``sweep.lua`` and ``tally.lua``) comes from
    ``taskd.engine.redis.keys`` (its ``K`` table), and every name there is used."""
    import re
    from importlib import resources

    from taskd.engine import codec
    from taskd.engine.redis import keys, space

    files = resources.files("taskd.engine.redis")
    parts = ("script.lua", "trees.lua", "sweep.lua", "tally.lua")
    source = "".join(files.joinpath(n).read_text("utf-8") for n in parts)
    assert re.findall(r"\bk\('", source) == []  # k(K.NAME ...) only
    used = set(re.findall(r"\bK\.([A-Z_]+)", source))
    named = set(keys.KEYS) | {n for n in keys.__all__ if n.startswith("ENTRY_")}
    assert used <= named
    assert keys.lua_table() in space.SCRIPT and "@KEYS@" not in space.SCRIPT
    python = "".join(
        p.read_text("utf-8")
        for p in Path(space.__file__).parent.glob("*.py")
        if p.name != "keys.py"
    )
    assert re.findall(r"\.key\(\"", python) == []
    for name in keys.KEYS:
        assert name in used or f"keys.{name}" in python, f"{name} is named but never used"
    # The record fields the script reads by name are the codec's.
    assert set(re.findall(r"\br\.([a-z]{2})\b", source)) <= set(codec.REDIS_FIELDS)


async def test_the_library_is_loaded_again_when_redis_lost_it(
    redis_server: RedisServer,
) -> None:
    """The commands are a Functions library named by its code's hash: a Redis that
    lost its functions (restarted without persistence, ``FUNCTION FLUSH``) answers
    "Function not found", and the batch goes again once the library is loaded; reads
    go to the ``no-writes`` function."""
    from taskd._retention import Retention
    from taskd.engine.redis import space

    assert space.SHA[:12] == space.FUNCTION.removeprefix("taskd_")
    assert space.LIBRARY.startswith(f"#!lua name={space.FUNCTION}\n")
    s = space.RedisSpace(redis_server.url, prefix(), Retention(), 5.0)
    try:
        for _ in range(2):
            redis_server.command("FUNCTION", "FLUSH")
            new = ("-", "x", "", "", "", "", uuid.uuid4().hex)
            replay = ("0-0", "10")
            created, replayed = await s.call([("create", new), ("replay", replay)], time.time())
            assert created[0] == "rec" and replayed[0] == "replay"
        listed = redis_server.command("FUNCTION", "LIST", "LIBRARYNAME", space.FUNCTION)
        assert space.FUNCTION_RO.encode() in listed and b"no-writes" in listed
    finally:
        await s.aclose()


async def test_every_key_in_redis_is_one_keys_names(redis_server: RedisServer) -> None:
    """What a deployment leaves in Redis after every kind of command: each key is
    ``{prefix}`` and a suffix of ``taskd.engine.redis.keys``, and each record (one
    JSON string) holds only the codec's fields."""
    import redis as redis_py

    from taskd.engine import codec
    from taskd.engine.redis import keys

    space = prefix()
    hooks = taskd.Webhooks(secret="s", allow=("127.0.0.1:9",))  # nothing listens: fine
    async with taskd.Tracker(redis=redis_server.url, redis_prefix=space, webhooks=hooks) as tracker:
        a = await tracker.create("a", resource_id="r1", owner="o", heartbeat_timeout=60)
        b = await tracker.create("b", callback_url="http://127.0.0.1:9/hook", metadata={"m": 1})
        await tracker.start(a.task_id, owner="o")
        await tracker.progress(a.task_id, 0.5, message="half", owner="o")
        await tracker.cancel(a.task_id, owner="o")
        await tracker.start(b.task_id)
        await tracker.complete(b.task_id, result={"x": 1})
        handle = await tracker.spawn(asyncio.sleep(0), task_type="s")
        await handle
        await tracker.delete(b.task_id)
        # a tree: a parent awaiting its child holds its outcome (docs/trees.md)
        root = await tracker.create("t", await_children=True)
        await tracker.create("t", parent_id=root.task_id)
        await tracker.start(root.task_id)
        await tracker.complete(root.task_id, result={"n": 1})
    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    try:
        base = "{" + space + "}"
        found = [key.removeprefix(base) for key in client.scan_iter(base + "*")]
        records = [key for key in client.scan_iter(base + keys.RECORD + "*")]
        fields = {f for key in records for f in json.loads(client.get(key) or "{}")}
    finally:
        client.close()
    suffixes = set(keys.KEYS.values())
    for suffix in found:
        assert suffix in suffixes or any(
            s.endswith(":") and suffix.startswith(s) for s in suffixes
        ), suffix
    assert {keys.ALL, keys.COUNTS, keys.CHANGES, keys.OUTBOX, keys.SEQ} <= set(found)
    assert keys.LIVE in found and any(f.startswith(keys.BY_PARENT) for f in found)
    assert records and fields <= set(codec.REDIS_FIELDS)
    assert {"pa", "ch", "aw", "hd"} <= fields


# --- task trees across processes (docs/trees.md) -------------------------------------


def _engine_of(shared: Shared, space: str) -> Engine:
    """``Tracker`` options for the task space ``space`` on ``shared``."""
    if shared.cluster is not None:
        return {"redis_cluster": shared.cluster.url, "redis_prefix": space}
    assert shared.server is not None
    return {"redis": shared.server.url, "redis_prefix": space}


async def test_a_tree_is_cancelled_from_another_process(shared: Shared) -> None:
    """A tree across two processes: a's parent, b's spawned child. a's cancel
    cascades (one script call) to the child, whose coroutine in b learns it from b's
    notes; the parent is cancelling until b records its child cancelled, then
    cancelled, with its children's counts."""
    space = prefix()
    started = asyncio.Event()

    async def child() -> None:
        started.set()
        await asyncio.Event().wait()

    async with (
        taskd.Tracker(**_engine_of(shared, space)) as a,
        taskd.Tracker(**_engine_of(shared, space)) as b,
    ):
        root = await a.create("import", owner="alice")
        h = await b.spawn(child(), task_type="part", owner="alice", parent_id=root.task_id)
        await started.wait()
        got = await a.get(root.task_id, owner="alice")
        assert got is not None and dict(got.children) == {"running": 1}
        assert [r.task_id for r in await a.list(parent_id=root.task_id)] == [h.task_id]
        listed = await b.list(parent_id=root.task_id, owner="alice")
        assert [r.task_id for r in listed] == [h.task_id]
        assert await b.list(parent_id=root.task_id, owner="bob") == []
        with pytest.raises(taskd.TaskNotFound):  # another owner's parent
            await b.create("part", owner="bob", parent_id=root.task_id)
        rec = await a.cancel(root.task_id, reason="stop", owner="alice")
        assert rec.status is taskd.TaskStatus.CANCELLING  # its child has yet to unwind
        with pytest.raises(asyncio.CancelledError):
            await h
        done = await a.wait(root.task_id, timeout=10, owner="alice")
        assert done.status is taskd.TaskStatus.CANCELLED and done.error == "stop"
        assert dict(done.children) == {"cancelled": 1}
        kid = await a.get(h.task_id)
        assert kid is not None and kid.status is taskd.TaskStatus.CANCELLED
        assert kid.parent_id == root.task_id
        assert await b.delete_many(status="cancelled", owner="alice") == 2  # with its subtree


async def test_a_held_spawned_parent_outlives_its_process(shared: Shared) -> None:
    """A spawned task cancelled while its child works: its coroutine ends, and its
    record waits, cancelling, for the child, out of its process's runs. That process
    may then go (its runs are swept as lost): the parent is not "process lost", and
    its child's end makes it cancelled."""
    from taskd.engine.redis import keys

    space = prefix()
    started = asyncio.Event()

    async def parent() -> None:
        started.set()
        await asyncio.Event().wait()

    base = "{" + space + "}"
    async with taskd.Tracker(**_engine_of(shared, space)) as a:
        async with taskd.Tracker(**_engine_of(shared, space)) as b:
            proc = b._engine.proc  # type: ignore[attr-defined]
            h = await b.spawn(parent(), task_type="parent")
            await started.wait()
            kid = await a.create("part", parent_id=h.task_id)
            await a.start(kid.task_id)
            runs = base + keys.RUNS + proc
            assert shared.node(runs).command("SISMEMBER", runs, h.task_id) == b":1\r\n"
            await a.cancel(h.task_id)
            with pytest.raises(asyncio.CancelledError):
                await h
            got = await b.get(h.task_id)
            assert got is not None and got.status is taskd.TaskStatus.CANCELLING
            assert shared.node(runs).command("SISMEMBER", runs, h.task_id) == b":0\r\n"
        procs = base + keys.PROCS

        def swept() -> bool:  # b is gone: a's sweep found it so
            return shared.node(procs).command("SISMEMBER", procs, proc) == b":0\r\n"

        await eventually(swept, 10)
        got = await a.get(h.task_id)
        assert got is not None and got.status is taskd.TaskStatus.CANCELLING
        rec = await a.cancel(kid.task_id, confirm=True)  # its worker stopped
        assert rec.status is taskd.TaskStatus.CANCELLED
        got = await a.get(h.task_id)
        assert got is not None and got.status is taskd.TaskStatus.CANCELLED


async def test_retention_and_the_cap_keep_the_parents_of_active_tasks(shared: Shared) -> None:
    """The cap evicts the oldest finished task that is no parent of an active one
    (and refuses when every finished task is one); the TTL sweep keeps a finished
    parent while a descendant is active, and its last descendant's end removes it."""
    from taskd.engine.redis import keys

    clock = FakeClock()
    space = prefix()
    retention = taskd.Retention(completed_ttl=10.0, max_tasks=4)
    async with taskd.Tracker(retention=retention, clock=clock, **_engine_of(shared, space)) as t:
        root = await t.create("import")
        kid = await t.create("part", parent_id=root.task_id)
        other = await t.create("other")
        for tid in (root.task_id, other.task_id):
            await t.start(tid)
            await t.complete(tid)
        await t.create("x")  # four: the cap
        await t.create("y")  # evicts the oldest finished one that is no parent
        assert await t.get(other.task_id) is None and await t.get(root.task_id) is not None
        with pytest.raises(taskd.TrackerFull, match="or their parents"):
            await t.create("z")
        clock.advance(60)
        kept = "{" + space + "}" + keys.KEPT

        async def is_kept() -> bool:
            await t.get(root.task_id)  # (reads let the sweep's timer fire)
            return shared.node(kept).command("SISMEMBER", kept, root.task_id) == b":1\r\n"

        await eventually(is_kept, 10)
        assert await t.get(root.task_id) is not None
        await t.start(kid.task_id)
        await t.complete(kid.task_id)
        assert await t.get(root.task_id) is None  # its TTL had passed: gone with its child's end
        child = await t.get(kid.task_id)
        assert child is not None and child.parent_id == root.task_id  # its own TTL
        assert await t.list(parent_id=root.task_id) == [child]
