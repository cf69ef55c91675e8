"""Push (docs/http-api.md): Server-Sent Events and signed webhooks, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import taskd
import taskd.web
from taskd.client import TaskdClient
from taskd.testing import eventually

from .clients import MakeClient
from .conftest import Engine
from .service import cli

Client = TestClient[web.Request, web.Application]
API = "/api/v1"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
async def app_client(serve: Callable[..., Awaitable[Client]]) -> Client:
    """The standalone application on each engine, and ``taskd.asgi`` under uvicorn."""
    return await serve(sse_ping_interval=0.2, close_timeout=0.2)


def base_url(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def create(client: Client, **fields: Any) -> dict[str, Any]:
    fields.setdefault("task_type", "job")
    resp = await client.post(f"{API}/tasks", json=fields)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["result"]


async def collect(
    stream: AsyncIterator[taskd.TaskRecord], n: int | None = None
) -> list[taskd.TaskRecord]:
    out = []
    async for rec in stream:
        out.append(rec)
        if n is not None and len(out) == n:
            break
    return out


async def subscribed(client: Client, n: int) -> None:
    """Wait until ``n`` event streams are registered with the actor (its stats)."""
    tracker = taskd.web.get_tracker(client.app)

    async def ready() -> bool:
        return (await tracker.stats())["subscriptions"] == n

    await eventually(ready)


# --- per-task stream -------------------------------------------------------------


async def test_task_stream_sends_current_state_then_changes_and_ends(app_client: Client) -> None:
    tid = (await create(app_client))["task_id"]
    async with TaskdClient(base_url(app_client)) as c:
        reader = asyncio.ensure_future(collect(c.events(tid)))
        await subscribed(app_client, 1)
        await app_client.post(f"{API}/tasks/{tid}/start")
        await app_client.post(f"{API}/tasks/{tid}/progress", json={"progress": 0.5})
        await app_client.post(f"{API}/tasks/{tid}/complete", json={"result": 7})
        got = await asyncio.wait_for(reader, 10)  # the stream ends by itself
    assert [(r.status.value, r.progress) for r in got] == [
        ("pending", None),
        ("running", None),
        ("running", 0.5),
        ("completed", 1.0),
    ]
    assert got[-1].result == 7


async def test_task_stream_of_a_finished_task_and_reconnect(app_client: Client) -> None:
    tid = (await create(app_client))["task_id"]
    await app_client.post(f"{API}/tasks/{tid}/cancel")
    async with TaskdClient(base_url(app_client)) as c:
        got = await asyncio.wait_for(collect(c.events(tid)), 5)
        assert [r.status.value for r in got] == ["cancelled"]
        last = c.last_event_id
    # an EventSource reconnecting after the end is told to stop: 204
    resp = await app_client.get(f"{API}/tasks/{tid}/events", headers={"Last-Event-ID": str(last)})
    assert resp.status == 204
    # one that missed the end gets it, then the stream closes
    resp = await app_client.get(f"{API}/tasks/{tid}/events", headers={"Last-Event-ID": "1"})
    assert resp.status == 200 and b"cancelled" in await resp.read()
    resp = await app_client.get(f"{API}/tasks/nope/events")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_stream_headers_and_keepalive_pings(app_client: Client) -> None:
    tid = (await create(app_client))["task_id"]
    resp = await app_client.get(f"{API}/tasks/{tid}/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    first = await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"id: ") and b"data: {" in first
    ping = await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 5)
    assert ping.startswith(b": ping")
    resp.close()


async def test_last_event_id_resumes_missed_changes(
    app_client: Client, make_client: MakeClient
) -> None:
    async with make_client(base_url(app_client)) as c:
        stream = c.events()
        reader = asyncio.ensure_future(collect(stream, 2))
        await subscribed(app_client, 1)
        a = (await create(app_client))["task_id"]
        await app_client.post(f"{API}/tasks/{a}/start")
        await asyncio.wait_for(reader, 5)
        last = c.last_event_id
        assert last is not None
        # changes while disconnected
        await app_client.post(f"{API}/tasks/{a}/progress", json={"progress": 0.3})
        b = (await create(app_client))["task_id"]
        resumed = await asyncio.wait_for(collect(c.events(last_event_id=last), 2), 5)
    assert [(r.task_id, r.status.value, r.progress) for r in resumed] == [
        (a, "running", 0.3),
        (b, "pending", None),
    ]


# --- global stream ---------------------------------------------------------------


async def test_global_stream_filters(app_client: Client) -> None:
    async with TaskdClient(base_url(app_client)) as c:
        failed = asyncio.ensure_future(collect(c.events(status="failed"), 1))
        typed = asyncio.ensure_future(collect(c.events(task_type="wanted"), 2))
        await subscribed(app_client, 2)
        x = (await create(app_client, task_type="other"))["task_id"]
        await app_client.post(f"{API}/tasks/{x}/start")
        await app_client.post(f"{API}/tasks/{x}/fail", json={"error": "password=hunter2"})
        y = (await create(app_client, task_type="wanted"))["task_id"]
        await app_client.post(f"{API}/tasks/{y}/cancel")
        [only_failed] = await asyncio.wait_for(failed, 5)
        assert only_failed.task_id == x and only_failed.error == "password=[REDACTED]"
        assert [(r.task_id, r.status.value) for r in await asyncio.wait_for(typed, 5)] == [
            (y, "pending"),
            (y, "cancelled"),
        ]
    resp = await app_client.get(f"{API}/events?status=bogus")
    assert resp.status == 400


async def test_global_stream_is_owner_scoped(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    tokens = {"tok-a": "alice", "tok-b": "bob"}
    app = taskd.web.create_app(auth=taskd.web.bearer_auth(tokens), sse_ping_interval=0.2)
    client = await aiohttp_client(app)
    async with TaskdClient(base_url(client), token="tok-b") as bob:
        seen = asyncio.ensure_future(collect(bob.events(), 1))
        await subscribed(client, 1)
        for token in ("tok-a", "tok-b"):
            resp = await client.post(
                f"{API}/tasks",
                json={"task_type": token.replace("-", "_")},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert resp.status == 201
        [rec] = await asyncio.wait_for(seen, 5)
        assert rec.task_type == "tok_b"
    resp = await client.get(f"{API}/events")
    assert resp.status == 401


async def test_stuck_subscriber_does_not_slow_another(app_client: Client) -> None:
    host, port = app_client.server.host, app_client.server.port
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, port))
    stuck.sendall(f"GET {API}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())  # never reads
    n = 600
    try:
        async with TaskdClient(base_url(app_client)) as c:
            reader = asyncio.ensure_future(collect(c.events(), n))
            await subscribed(app_client, 2)  # the stuck one and this one
            tracker = taskd.web.get_tracker(app_client.app)
            started = time.monotonic()
            for i in range(n // 3):
                rec = await tracker.create("load", metadata={"pad": "x" * 500, "i": i})
                await tracker.start(rec.task_id)
                await tracker.complete(rec.task_id, i)
            got = await asyncio.wait_for(reader, 30)
            elapsed = time.monotonic() - started
            # every change reached the live subscriber, in order
            assert len(got) == n
            assert [r.status.value for r in got[:3]] == ["pending", "running", "completed"]
            # and the actor still answers at once
            assert await asyncio.wait_for(tracker.get(got[-1].task_id), 1) is not None
            print(f"\n{n} changes to a live subscriber beside a stuck one: {elapsed:.2f}s")
    finally:
        stuck.close()


# --- webhooks --------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback: fails the first ``fail_first`` deliveries."""

    def __init__(self, fail_first: int = 0, hang: float = 0.0) -> None:
        self.fail_first = fail_first
        self.hang = hang
        self.calls: list[tuple[float, dict[str, str], bytes]] = []
        self.app = web.Application()
        self.app.router.add_post("/hook", self.handle)
        self.server = TestServer(self.app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append((time.monotonic(), request.headers.copy(), body))  # type: ignore[arg-type]
        if self.hang:
            await asyncio.sleep(self.hang)
        if len(self.calls) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hook"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make(**kwargs: Any) -> Receiver:
        r = Receiver(**kwargs)
        await r.server.start_server()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.server.close()


def verify(secret: str, headers: Any, body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    scheme, _, given = headers["webhook-signature"].partition(",")
    return scheme == "v1" and hmac.compare_digest(given, expected)


async def test_webhook_retried_then_delivered_and_signed(
    aiohttp_client: Callable[..., Awaitable[Client]], receivers: Any, engine: Engine
) -> None:
    rx = await receivers(fail_first=2)
    hooks = taskd.Webhooks(secret=SECRET, allow=(rx.netloc,), first_retry=0.1)
    client = await aiohttp_client(taskd.web.create_app(webhooks=hooks, **engine))
    tid = (await create(client, callback_url=rx.url))["task_id"]
    await client.post(f"{API}/tasks/{tid}/start")
    await client.post(f"{API}/tasks/{tid}/complete", json={"result": {"ok": 1}})
    tracker = taskd.web.get_tracker(client.app)

    async def delivered() -> bool:
        return (await tracker.stats())["webhooks_delivered"] == 1

    await eventually(delivered)  # counted once the 2xx is in: no retry follows it
    assert len(rx.calls) == 3  # failed, failed, delivered
    ids = {headers["webhook-id"] for _, headers, _ in rx.calls}
    assert len(ids) == 1  # retries carry the same message id
    for _, headers, body in rx.calls:
        assert verify(SECRET, headers, body)
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    record = json.loads(rx.calls[-1][2])
    assert record["task_id"] == tid and record["status"] == "completed"
    stats = await tracker.stats()
    assert (stats["webhooks_delivered"], stats["webhooks_failed"]) == (1, 0)
    metrics = await (await client.get("/metrics")).text()
    # (with Redis, labelled with the process that delivered it: docs/operations.md)
    assert re.search(r"^taskd_webhooks_delivered_total(\{process=.*\})? 1\.0$", metrics, re.M)
    assert record["result"] == {"ok": 1}
    # the first retry came well within 5 seconds, and backoff grew
    t0, t1, t2 = (t for t, _, _ in rx.calls)
    assert t1 - t0 < 5 and (t2 - t1) > (t1 - t0) * 0.9


async def test_webhook_for_spawned_task(receivers: Any, engine: Engine) -> None:
    rx = await receivers()
    hooks = taskd.Webhooks(secret="plain-secret", allow=(rx.netloc,))
    async with taskd.Tracker(webhooks=hooks, **engine) as t:

        async def work() -> int:
            raise RuntimeError("api_key=abc123 rejected")

        handle = await t.spawn(work(), task_type="x", callback_url=rx.url)
        with pytest.raises(RuntimeError):
            await handle
        await eventually(lambda: bool(rx.calls))
    _, headers, body = rx.calls[0]
    key = b"plain-secret"
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    assert (
        headers["webhook-signature"]
        == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    )
    assert json.loads(body)["error"] == "RuntimeError: api_key=[REDACTED] rejected"


async def test_callback_outside_allow_list_is_refused(
    aiohttp_client: Callable[..., Awaitable[Client]], receivers: Any
) -> None:
    rx = await receivers()
    hooks = taskd.Webhooks(secret=SECRET, allow=(rx.netloc,))
    client = await aiohttp_client(taskd.web.create_app(webhooks=hooks))
    for url in (
        "http://169.254.169.254/latest/meta-data",
        f"http://127.0.0.1:{rx.server.port + 1}/hook",
        "http://localhost/hook",
        "ftp://127.0.0.1/x",
        f"http://user:pw@{rx.netloc}/hook",
    ):
        resp = await client.post(f"{API}/tasks", json={"task_type": "x", "callback_url": url})
        assert resp.status == 400, url
        assert (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"
    assert (await client.get(f"{API}/tasks")).status == 200
    assert (await (await client.get(f"{API}/tasks")).json())["result"] == []
    async with taskd.Tracker() as t:  # no webhooks configured: nothing is allowed
        with pytest.raises(ValueError, match="allow-list"):
            await t.create("x", callback_url=rx.url)


async def test_hanging_receiver_does_not_delay_others(receivers: Any) -> None:
    slow = await receivers(hang=5.0)
    fast = await receivers()
    hooks = taskd.Webhooks(secret=SECRET, allow=(slow.netloc, fast.netloc), timeout=8)
    async with taskd.Tracker(webhooks=hooks, close_timeout=0.1) as t:
        a = await t.create("x", callback_url=slow.url)
        b = await t.create("x", callback_url=fast.url)
        await t.cancel(a.task_id)
        await eventually(lambda: len(slow.calls) == 1)  # the slow delivery is now hanging
        started = time.monotonic()
        await t.cancel(b.task_id)
        await eventually(lambda: bool(fast.calls))
        assert fast.calls[0][0] - started < 2.0
        assert len(slow.calls) == 1


def test_redirects_are_not_followed() -> None:
    from taskd._webhooks import _post

    async def run() -> tuple[int, int]:
        hits = {"target": 0}

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound("/target")

        async def target(request: web.Request) -> web.Response:
            hits["target"] += 1
            return web.Response()

        app = web.Application()
        app.router.add_post("/hook", redirect)
        app.router.add_post("/target", target)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            url = f"http://127.0.0.1:{server.port}/hook"
            status = await asyncio.get_running_loop().run_in_executor(
                None, _post, url, b"{}", {}, 5.0
            )
        finally:
            await server.close()
        return status, hits["target"]

    status, target_hits = asyncio.run(run())
    assert status == 302 and target_hits == 0


def test_webhooks_config_is_checked() -> None:
    with pytest.raises(ValueError):
        taskd.Webhooks(secret="")
    with pytest.raises(ValueError):
        taskd.Webhooks(secret="s", allow=("host:99999",))
    with pytest.raises(TypeError):
        taskd.Webhooks(secret="s", allow="host")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        taskd.Webhooks(secret="s", first_retry=10)
    with pytest.raises(TypeError):
        taskd.Tracker(webhooks={"secret": "s"})  # type: ignore[arg-type]
    out = cli("serve", "--webhook-allow", "127.0.0.1:9", "--port", "1")
    assert out.returncode == 1 and "--webhook-secret" in out.stderr


# --- whsec_ secrets and the Standard Webhooks library ----------------------------------

KEY = bytes(range(200, 232))  # 32 bytes: both "+" and "/" in standard base64
STANDARD = base64.b64encode(KEY).decode()
URLSAFE = base64.urlsafe_b64encode(KEY).decode()


async def test_standard_whsec_secret_verifies_with_the_reference_library(
    receivers: Any,
) -> None:
    """A real delivery, verified by the Standard Webhooks library with the very
    secret taskd was given, padded or not (docs/http-api.md)."""
    from standardwebhooks.webhooks import Webhook

    for secret in ("whsec_" + STANDARD, "whsec_" + STANDARD.rstrip("=")):
        rx: Receiver = await receivers()

        async def delivered(rx: Receiver = rx) -> bool:
            return bool(rx.calls)

        hooks = taskd.Webhooks(secret=secret, allow=(rx.netloc,))
        async with taskd.Tracker(webhooks=hooks) as tracker:
            handle = await tracker.spawn(asyncio.sleep(0, 7), task_type="x", callback_url=rx.url)
            assert await handle == 7
            await eventually(delivered)
        _, headers, body = rx.calls[0]
        assert Webhook(secret).verify(body, dict(headers))["result"] == 7


def test_urlsafe_whsec_secret_is_refused_in_python_and_at_start() -> None:
    """The library drops "-" and "_": it would verify with another key, so every
    delivery would fail on the receiver's side. Refused before anything is sent."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    secret = "whsec_" + URLSAFE
    assert "-" in URLSAFE and "_" in URLSAFE
    # What accepting it would have meant: signed with the real key, not verifiable.
    body, ts = b'{"task_id":"x"}', int(time.time())
    sig = taskd._webhooks.sign("whsec_" + STANDARD, "msg_1", ts, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": sig}
    with pytest.raises((WebhookVerificationError, ValueError)):  # binascii.Error unpadded
        Webhook(secret).verify(body, headers)
    with pytest.raises((WebhookVerificationError, ValueError)):
        Webhook(secret.rstrip("=")).verify(body, headers)

    for text in (secret, secret.rstrip("="), "whsec_abc-def_ghij"):
        with pytest.raises(ValueError, match="URL-safe base64") as err:
            taskd.Webhooks(secret=text)
        assert "\n" not in str(err.value) and "--webhook-secret" in str(err.value)
    # taskd serve: one line naming the flag, exit 1, before it listens.
    port = "1"  # never reached: the secret is checked first
    for args, env in (
        (("--webhook-secret", secret), {}),
        ((), {"TASKD_WEBHOOK_SECRET": secret}),
    ):
        out = cli("serve", "--port", port, *args, env=env)
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "URL-safe base64" in lines[0], out.stderr
        assert "--webhook-secret" in lines[0] and "TASKD_WEBHOOK_SECRET" in lines[0]
        assert URLSAFE[:10] not in out.stderr  # the secret itself is never echoed
