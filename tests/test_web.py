"""The HTTP API of docs/http-api.md through a real aiohttp server (pytest-aiohttp)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import taskd
import taskd.web
from taskd.testing import eventually

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
API = "/api/v1"


@pytest.fixture
async def client(serve: MakeClient) -> Client:
    """The standalone application on each engine, and ``taskd.asgi`` under uvicorn."""
    return await serve(close_timeout=0.2)


async def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["status"] == "ok"
    return body["result"]


async def err(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]


async def create(client: Client, **fields: Any) -> dict[str, Any]:
    fields.setdefault("task_type", "reindex")
    return await ok(await client.post(f"{API}/tasks", json=fields), 201)


# --- success paths ---------------------------------------------------------------


async def test_create_get_and_lifecycle(client: Client) -> None:
    resp = await client.post(
        f"{API}/tasks", json={"task_type": "reindex", "resource_id": "idx-7", "metadata": {"a": 1}}
    )
    rec = await ok(resp, 201)
    tid = rec["task_id"]
    assert resp.headers["Location"] == f"{API}/tasks/{tid}"
    assert rec["status"] == "pending" and rec["metadata"] == {"a": 1}
    assert rec["created_at_iso"].endswith("Z")

    resp = await client.get(f"{API}/tasks/{tid}")
    assert (await ok(resp))["task_id"] == tid
    assert resp.headers["Cache-Control"] == "no-store"
    assert int(resp.headers["Retry-After"]) >= 1

    assert (await ok(await client.post(f"{API}/tasks/{tid}/start")))["status"] == "running"
    prog = await ok(
        await client.post(f"{API}/tasks/{tid}/progress", json={"progress": 0.5, "message": "half"})
    )
    assert (prog["progress"], prog["message"]) == (0.5, "half")
    done = await ok(await client.post(f"{API}/tasks/{tid}/complete", json={"result": {"n": 3}}))
    assert done["status"] == "completed" and done["result"] == {"n": 3}

    resp = await client.get(f"{API}/tasks/{tid}")
    assert "Retry-After" not in resp.headers and "Cache-Control" not in resp.headers

    resp = await client.delete(f"{API}/tasks/{tid}")
    assert resp.status == 204
    await err(await client.get(f"{API}/tasks/{tid}"), 404, "NOT_FOUND")


async def test_fail_is_redacted(client: Client) -> None:
    tid = (await create(client))["task_id"]
    await client.post(f"{API}/tasks/{tid}/start")
    rec = await ok(
        await client.post(
            f"{API}/tasks/{tid}/fail", json={"error": "boom api_key=sk-abcdefghijklmnopqrstu"}
        )
    )
    assert rec["status"] == "failed" and rec["error"] == "boom api_key=[REDACTED]"


async def test_cancel_running_external_then_worker_sees_it(client: Client) -> None:
    tid = (await create(client))["task_id"]
    await client.post(f"{API}/tasks/{tid}/start")
    rec = await ok(await client.post(f"{API}/tasks/{tid}/cancel"), 202)
    assert rec["status"] == "cancelling"
    seen = await ok(await client.post(f"{API}/tasks/{tid}/progress", json={"progress": 0.9}))
    assert seen["status"] == "cancelling"
    # a client's retried cancel: 200, the record as it is (docs/http-api.md)
    assert await ok(await client.post(f"{API}/tasks/{tid}/cancel"), 200) == seen
    # the worker acknowledges
    confirm = {"confirm": True}
    rec = await ok(await client.post(f"{API}/tasks/{tid}/cancel", json=confirm), 202)
    assert rec["status"] == "cancelled"
    assert await ok(await client.post(f"{API}/tasks/{tid}/cancel"), 200) == rec
    assert await ok(await client.post(f"{API}/tasks/{tid}/cancel", json=confirm), 200) == rec
    await err(
        await client.post(f"{API}/tasks/{tid}/cancel", json={"confirm": "yes"}),
        400,
        "INVALID_ARGUMENT",
    )
    done = (await create(client))["task_id"]
    await ok(await client.post(f"{API}/tasks/{done}/start"))
    await ok(await client.post(f"{API}/tasks/{done}/complete", json={"result": 1}))
    for body in (None, confirm):
        resp = await client.post(f"{API}/tasks/{done}/cancel", json=body)
        await err(resp, 409, "FAILED_PRECONDITION")


async def test_conflict_names_the_active_task(client: Client) -> None:
    first = await create(client, resource_id="s1")
    e = await err(
        await client.post(f"{API}/tasks", json={"task_type": "reindex", "resource_id": "s1"}),
        409,
        "CONFLICT",
    )
    assert e["details"]["task_id"] == first["task_id"]


async def test_delete_active_is_409(client: Client) -> None:
    tid = (await create(client))["task_id"]
    await err(await client.delete(f"{API}/tasks/{tid}"), 409, "FAILED_PRECONDITION")


async def test_health_and_openapi(client: Client) -> None:
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    doc = await (await client.get(f"{API}/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")


# --- long-poll -------------------------------------------------------------------


async def test_long_poll_returns_early_on_completion(client: Client) -> None:
    tid = (await create(client))["task_id"]
    await client.post(f"{API}/tasks/{tid}/start")
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll = asyncio.ensure_future(client.get(f"{API}/tasks/{tid}?wait=30"))
    tracker = taskd.web.get_tracker(client.app)

    async def parked() -> bool:
        return (await tracker.stats())["waiters"] == 1

    await eventually(parked)
    assert not poll.done()
    await client.post(f"{API}/tasks/{tid}/complete", json={"result": 1})
    rec = await ok(await asyncio.wait_for(poll, 10))
    assert rec["status"] == "completed"
    assert loop.time() - started < 10


async def test_long_poll_timeout_gives_latest_state(client: Client) -> None:
    tid = (await create(client))["task_id"]
    await client.post(f"{API}/tasks/{tid}/progress", json={"progress": 0.3})
    resp = await client.get(f"{API}/tasks/{tid}?wait=0.2")
    rec = await ok(resp)
    assert rec["status"] == "pending" and rec["progress"] == 0.3
    assert resp.headers["Retry-After"]


# --- listing ---------------------------------------------------------------------


async def test_list_filters_pages_and_link(client: Client) -> None:
    ids = [(await create(client, task_type="a" if i % 2 else "b"))["task_id"] for i in range(7)]
    await client.post(f"{API}/tasks/{ids[0]}/cancel")
    await client.post(f"{API}/tasks/{ids[1]}/start")
    await client.post(f"{API}/tasks/{ids[1]}/fail", json={"error": "x"})

    resp = await client.get(f"{API}/tasks?limit=3")
    body = await resp.json()
    assert [r["task_id"] for r in body["result"]] == ids[::-1][:3]
    token = body["next_page_token"]
    assert token and 'rel="next"' in resp.headers["Link"]
    seen = [r["task_id"] for r in body["result"]]
    await create(client)  # a newer task must not shift the next pages
    while token:
        resp = await client.get(f"{API}/tasks", params={"limit": "3", "page_token": token})
        body = await resp.json()
        seen += [r["task_id"] for r in body["result"]]
        token = body["next_page_token"]
    assert seen == ids[::-1]
    assert "Link" not in resp.headers

    both = await ok(await client.get(f"{API}/tasks?status=failed&status=cancelled"))
    assert [r["task_id"] for r in both] == [ids[1], ids[0]]
    comma = await ok(await client.get(f"{API}/tasks?status=failed,cancelled"))
    assert comma == both
    typed = await ok(await client.get(f"{API}/tasks?task_type=a"))
    assert all(r["task_type"] == "a" for r in typed) and len(typed) == 3


async def test_link_header_follows_to_next_page(client: Client) -> None:
    for _ in range(3):
        await create(client)
    resp = await client.get(f"{API}/tasks?limit=2&task_type=reindex")
    link = resp.headers["Link"]
    url = link[link.index("<") + 1 : link.index(">")]
    page2 = await ok(await client.get(url))
    assert len(page2) == 1


# --- bad input, per route --------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("GET", "/tasks?limit=0", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?limit=-1", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?limit=201", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?limit=ten", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?limit=1&limit=2", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?status=done", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?status=failed,nope", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?task_type=bad%20type", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?page_token=%%%", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks?page_token=eyJjIjoxfQ", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks/nope", None, 404, "NOT_FOUND"),
    ("GET", "/tasks/nope?wait=1", None, 404, "NOT_FOUND"),
    ("GET", "/tasks/nope?wait=0", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks/nope?wait=61", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks/nope?wait=abc", None, 400, "INVALID_ARGUMENT"),
    ("GET", "/tasks/nope?wait=nan", None, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", b"{not json", 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", b"[1,2]", 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", b"", 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", b"\xff\xfe", 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": 5}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": ""}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": "x" * 129}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": "ok", "bogus": 1}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": "ok", "metadata": [1]}, 400, "INVALID_ARGUMENT"),
    (
        "POST",
        "/tasks",
        {"task_type": "ok", "metadata": {"k": "v" * 17000}},
        400,
        "INVALID_ARGUMENT",
    ),
    ("POST", "/tasks", {"task_type": "ok", "resource_id": 7}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": "ok", "heartbeat_timeout": -1}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks", {"task_type": "ok", "heartbeat_timeout": True}, 400, "INVALID_ARGUMENT"),
    (
        "POST",
        "/tasks",
        {"task_type": "ok", "callback_url": "http://evil.example/"},
        400,
        "INVALID_ARGUMENT",
    ),
    ("POST", "/tasks", b"x" * (2 * 1024 * 1024), 413, "PAYLOAD_TOO_LARGE"),
    ("POST", "/tasks/nope/start", None, 404, "NOT_FOUND"),
    ("POST", "/tasks/nope/complete", {"result": 1}, 404, "NOT_FOUND"),
    ("POST", "/tasks/nope/fail", {"error": "x"}, 404, "NOT_FOUND"),
    ("POST", "/tasks/nope/cancel", None, 404, "NOT_FOUND"),
    ("DELETE", "/tasks/nope", None, 404, "NOT_FOUND"),
    ("POST", "/tasks/nope/fail", {}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks/nope/fail", {"error": 3}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks/nope/progress", {"progress": "half"}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks/nope/progress", {"progress": 2}, 400, "INVALID_ARGUMENT"),
    ("POST", "/tasks/nope/start", {"x": 1}, 400, "INVALID_ARGUMENT"),
    ("PATCH", "/tasks", None, 405, "METHOD_NOT_ALLOWED"),
    ("PUT", "/tasks/nope", None, 405, "METHOD_NOT_ALLOWED"),
    ("GET", "/tasks/nope/start", None, 405, "METHOD_NOT_ALLOWED"),
    ("GET", "/nowhere", None, 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS)
async def test_bad_requests(
    client: Client, method: str, path: str, body: Any, status: int, code: str
) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs["data"] = io.BytesIO(body) if len(body) > 1024 else body
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif body is not None:
        kwargs["json"] = body
    resp = await client.request(method, API + path, **kwargs)
    await err(resp, status, code)
    if status == 405:
        assert resp.headers["Allow"]


async def test_state_unchanged_after_bad_requests(client: Client) -> None:
    tid = (await create(client))["task_id"]
    before = await ok(await client.get(f"{API}/tasks/{tid}"))
    await client.post(f"{API}/tasks/{tid}/progress", json={"progress": 5})
    await client.post(f"{API}/tasks/{tid}/complete", json={"result": 1})  # pending: 409
    await client.post(f"{API}/tasks/{tid}/fail", data=b"{bad")
    assert await ok(await client.get(f"{API}/tasks/{tid}")) == before


async def test_page_token_from_another_filter_is_refused(client: Client) -> None:
    for _ in range(3):
        await create(client)
    body = await (await client.get(f"{API}/tasks?limit=1")).json()
    token = body["next_page_token"]
    await err(
        await client.get(
            f"{API}/tasks", params={"limit": "1", "status": "pending", "page_token": token}
        ),
        400,
        "INVALID_ARGUMENT",
    )


async def test_full_tracker_answers_503_with_retry_after(aiohttp_client: MakeClient) -> None:
    app = taskd.web.create_app(retention=taskd.Retention(max_tasks=1))
    client = await aiohttp_client(app)
    await create(client)
    resp = await client.post(f"{API}/tasks", json={"task_type": "x"})
    await err(resp, 503, "UNAVAILABLE")
    assert resp.headers["Retry-After"]


# --- auth and owners -------------------------------------------------------------

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


def bearer_auth(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    owner = TOKENS.get(token) if scheme == "Bearer" else None
    if owner is None:
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
    return owner


@pytest.fixture
async def auth_client(serve: MakeClient) -> Client:
    return await serve(auth=bearer_auth)


def as_(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_auth_rejects_missing_or_wrong_token(auth_client: Client, token: str | None) -> None:
    for method, path in [
        ("GET", "/tasks"),
        ("POST", "/tasks"),
        ("GET", "/tasks/x"),
        ("POST", "/tasks/x/cancel"),
        ("DELETE", "/tasks/x"),
    ]:
        resp = await auth_client.request(
            method, API + path, headers=as_(token), json={"task_type": "x"}
        )
        await err(resp, 401, "UNAUTHENTICATED")
        assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_owners_see_only_their_tasks(auth_client: Client) -> None:
    alice = await ok(
        await auth_client.post(
            f"{API}/tasks", json={"task_type": "x", "resource_id": "r"}, headers=as_("tok-alice")
        ),
        201,
    )
    # the dedup key includes the owner: bob may use the same (type, resource)
    bob = await ok(
        await auth_client.post(
            f"{API}/tasks", json={"task_type": "x", "resource_id": "r"}, headers=as_("tok-bob")
        ),
        201,
    )
    a_list = await ok(await auth_client.get(f"{API}/tasks", headers=as_("tok-alice")))
    assert [r["task_id"] for r in a_list] == [alice["task_id"]]
    b_list = await ok(await auth_client.get(f"{API}/tasks?resource_id=r", headers=as_("tok-bob")))
    assert [r["task_id"] for r in b_list] == [bob["task_id"]]
    for method, suffix in [("GET", ""), ("POST", "/start"), ("POST", "/cancel"), ("DELETE", "")]:
        resp = await auth_client.request(
            method, f"{API}/tasks/{alice['task_id']}{suffix}", headers=as_("tok-bob")
        )
        await err(resp, 404, "NOT_FOUND")
    assert (
        await ok(await auth_client.get(f"{API}/tasks/{alice['task_id']}", headers=as_("tok-alice")))
    )["status"] == "pending"


async def test_async_auth_callback(aiohttp_client: MakeClient) -> None:
    async def auth(request: web.Request) -> str:
        await asyncio.sleep(0)
        return bearer_auth(request)

    client = await aiohttp_client(taskd.web.create_app(auth=auth))
    await ok(await client.get(f"{API}/tasks", headers=as_("tok-bob")))
    await err(await client.get(f"{API}/tasks"), 401, "UNAUTHENTICATED")


# --- embedding -------------------------------------------------------------------


async def test_setup_embeds_in_an_app_and_spawn_accepted(aiohttp_client: MakeClient) -> None:
    app = web.Application()
    taskd.web.setup(app, close_timeout=0.2)
    gate = asyncio.Event()

    async def work() -> dict[str, int]:
        await gate.wait()
        return {"ok": 1}

    async def start(request: web.Request) -> web.Response:
        handle = await taskd.web.spawn(request, work(), task_type="job", resource_id="one")
        return taskd.web.accepted(request, handle)

    app.router.add_post("/start", start)
    client = await aiohttp_client(app)
    resp = await client.post("/start")
    rec = await ok(resp, 202)
    assert resp.headers["Location"] == f"{API}/tasks/{rec['task_id']}"
    # a second start while the first runs: the middleware answers the conflict
    e = await err(await client.post("/start"), 409, "CONFLICT")
    assert e["details"]["task_id"] == rec["task_id"]
    gate.set()
    done = await ok(await client.get(f"{resp.headers['Location']}?wait=5"))
    assert done["status"] == "completed" and done["result"] == {"ok": 1}
    assert taskd.web.get_tracker(app) is taskd.web.get_tracker(app)


async def test_get_tracker_without_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        taskd.web.get_tracker(web.Application())


async def test_get_tracker_from_a_subapp(aiohttp_client: MakeClient) -> None:
    app = web.Application()
    taskd.web.setup(app)
    sub = web.Application()
    found: list[taskd.Tracker] = []

    async def handler(request: web.Request) -> web.Response:
        found.append(taskd.web.get_tracker(request))
        return web.Response(text="ok")

    sub.router.add_get("/x", handler)
    app.add_subapp("/sub", sub)
    client = await aiohttp_client(app)
    assert (await client.get("/sub/x")).status == 200
    assert found == [taskd.web.get_tracker(app)]


async def test_setup_twice_and_bad_arguments() -> None:
    app = web.Application()
    taskd.web.setup(app)
    with pytest.raises(RuntimeError):
        taskd.web.setup(app)
    with pytest.raises(ValueError):
        taskd.web.setup(web.Application(), prefix="api/")
    with pytest.raises(TypeError):
        taskd.web.setup(web.Application(), auth="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        taskd.web.setup(object())  # type: ignore[arg-type]


async def test_app_cleanup_cancels_running_spawned_tasks(aiohttp_client: MakeClient) -> None:
    app = taskd.web.create_app(close_timeout=0.1)
    client = await aiohttp_client(app)
    tracker = taskd.web.get_tracker(app)
    handle = await tracker.spawn(asyncio.sleep(60), task_type="x")
    await client.close()  # runs the app's cleanup: the tracker shuts down
    assert handle.done()
    with pytest.raises(asyncio.CancelledError):
        await handle
    assert tracker.state is taskd.TrackerState.CLOSED


async def test_every_json_answer_ends_with_a_newline(client: Client) -> None:
    """docs/http-api.md: each JSON body is one line ending in a newline; an event
    stream's ``data:`` line stays one line (the record JSON, no newline inside)."""
    tid = (await create(client))["task_id"]
    answers = [
        await client.post(f"{API}/tasks", json={"task_type": "reindex"}),
        await client.get(f"{API}/tasks/{tid}"),
        await client.get(f"{API}/tasks"),
        await client.get(f"{API}/tasks", params={"limit": "1"}),
        await client.post(f"{API}/tasks/{tid}/start"),
        await client.post(f"{API}/tasks/{tid}/progress", json={"message": "a\nb"}),
        await client.get(f"{API}/tasks/nope"),
        await client.put(f"{API}/tasks"),
        await client.get(f"{API}/nowhere"),
        await client.post(f"{API}/tasks", data=b"{"),
        await client.get(f"{API}/stats"),
        await client.get(f"{API}/openapi.json"),
        await client.get("/health"),
    ]
    for resp in answers:
        body = await resp.read()
        assert resp.content_type == "application/json", (resp.url, body)
        assert body.endswith(b"\n") and body.count(b"\n") == 1, (resp.url, body)
        json.loads(body)
    await client.post(f"{API}/tasks/{tid}/complete", json={"result": {"lines": "x\ny"}})
    resp = await client.get(f"{API}/tasks/{tid}/events")
    text = (await resp.read()).decode()
    data = [line for line in text.splitlines() if line.startswith("data:")]
    assert data and json.loads(data[-1][5:])["result"] == {"lines": "x\ny"}


async def test_embedding_recipe_for_health_and_metrics(aiohttp_client: MakeClient) -> None:
    """The recipe of docs/embedding.md ("What an embedded app lacks"), run as written
    on a host application: /health and /metrics through public handlers."""
    from prometheus_client.parser import text_string_to_metric_families

    doc = (Path(__file__).parents[1] / "docs" / "embedding.md").read_text()
    section = doc.split("## What an embedded app lacks")[1].split("\n## ")[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    for auth in (None, taskd.web.bearer_auth({"tok": "alice"})):
        app = web.Application()
        taskd.web.setup(app, auth=auth)
        # the documented recipe, as written
        exec(match.group(1), {"app": app, "taskd": taskd, "web": web})
        client = await aiohttp_client(app)
        await taskd.web.get_tracker(app).create("recipe_check", owner="alice")
        headers = {} if auth is None else {"Authorization": "Bearer tok"}
        resp = await client.get("/health")
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
        if auth is not None:
            await err(await client.get("/metrics"), 401, "UNAUTHENTICATED")
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 200 and resp.content_type == "text/plain"
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await resp.text())
            for s in family.samples
        }
        key = ("taskd_tasks", (("status", "pending"), ("task_type", "recipe_check")))
        assert samples[key] == 1
        headers["Accept"] = "application/openmetrics-text; version=1.0.0"
        resp = await client.get("/metrics", headers=headers)
        assert resp.content_type == "application/openmetrics-text"
        await client.close()


async def test_routes_added_to_the_standalone_app_still_resolve(
    aiohttp_client: MakeClient,
) -> None:
    """docs/embedding.md: the standalone app answers unmatched paths with the envelope
    from a catch-all route (it runs no middleware), and routes an application adds
    to it afterwards, plain or with a variable part, still resolve before it."""
    app = taskd.web.create_app()

    async def custom(request: web.Request) -> web.Response:
        return web.json_response({"custom": request.match_info.get("name", "")})

    app.router.add_get("/custom", custom)
    app.router.add_get("/things/{name}", custom)
    client = await aiohttp_client(app)
    resp = await client.get("/custom")
    assert resp.status == 200 and (await resp.json()) == {"custom": ""}
    resp = await client.get("/things/a")
    assert resp.status == 200 and (await resp.json()) == {"custom": "a"}
    resp = await client.get("/nowhere/at/all")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"
    resp = await client.post("/health")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    assert (await resp.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
