"""What clients nobody here wrote tripped on: sub-applications, shutdown with long-polls
in flight, event ids across restarts, webhook secrets, empty filters, the error table
(docs/http-api.md), cancel_grace, and the CLI (docs/cli.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks.webhooks import Webhook

import taskd
import taskd.web
from taskd import _errors
from taskd.client import ApiError
from taskd.testing import FakeClock, eventually

from .clients import MakeClient as MakeTaskdClient
from .service import Service, cli, free_port
from .test_serve import http

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


# --- 1. aiohttp sub-application -------------------------------------------------------


def _deny(request: web.Request) -> str:
    if request.headers.get("Authorization") != "Bearer ok":
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
    return "me"


@pytest.fixture
async def mounted(aiohttp_client: MakeClient) -> Client:
    """taskd set up on a sub-application mounted at /svc of a host application."""
    sub = web.Application()
    taskd.web.setup(sub, auth=_deny, close_timeout=0.2)

    async def commit(request: web.Request) -> web.Response:
        async def work() -> int:
            return 1

        task = await taskd.web.spawn(request, work(), task_type="commit")
        return taskd.web.accepted(request, task)

    sub.router.add_post("/commit", commit)
    parent = web.Application()

    async def host_route(request: web.Request) -> web.Response:
        raise ValueError("the host's own bug")

    parent.router.add_get("/own", host_route)
    parent.add_subapp("/svc", sub)
    return await aiohttp_client(parent)


AUTH = {"Authorization": "Bearer ok"}


async def _envelope(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == "error" and body["error"]["code"] == code
    return body["error"]


async def test_sub_app_bad_task_type_is_400_not_500(mounted: Client) -> None:
    resp = await mounted.post("/svc/api/v1/tasks", json={"task_type": "no spaces"}, headers=AUTH)
    await _envelope(resp, 400, "INVALID_ARGUMENT")


async def test_sub_app_401_and_405_use_the_envelope(mounted: Client) -> None:
    await _envelope(await mounted.get("/svc/api/v1/tasks"), 401, "UNAUTHENTICATED")
    resp = await mounted.put("/svc/api/v1/tasks", headers=AUTH)
    await _envelope(resp, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in resp.headers["Allow"]


async def test_sub_app_locations_carry_the_mount_prefix(mounted: Client) -> None:
    resp = await mounted.post("/svc/api/v1/tasks", json={"task_type": "t"}, headers=AUTH)
    assert resp.status == 201
    tid = (await resp.json())["result"]["task_id"]
    assert resp.headers["Location"] == f"/svc/api/v1/tasks/{tid}"
    assert (await mounted.get(resp.headers["Location"], headers=AUTH)).status == 200
    resp = await mounted.post("/svc/commit", headers=AUTH)
    assert resp.status == 202
    assert resp.headers["Location"].startswith("/svc/api/v1/tasks/")


async def test_sub_app_openapi_paths_and_servers(mounted: Client) -> None:
    doc = await (await mounted.get("/svc/api/v1/openapi.json", headers=AUTH)).json()
    assert doc["paths"] and all(p.startswith("/svc/api/v1/") for p in doc["paths"])
    assert doc["servers"] == [{"url": "/", "description": "this server"}]


async def test_host_routes_are_not_judged_by_taskd(mounted: Client) -> None:
    # The host's own 404s and errors keep aiohttp's answers: taskd's envelope is for
    # taskd's routes only.
    resp = await mounted.get("/nowhere")
    assert resp.status == 404 and resp.content_type == "text/plain"
    resp = await mounted.get("/own")
    assert resp.status == 500 and resp.content_type == "text/plain"


# --- 2. shutdown with long-polls in flight ----------------------------------------------


async def test_app_runner_cleanup_answers_pending_long_polls() -> None:
    app = taskd.web.create_app(close_timeout=0.2)
    runner = web.AppRunner(app, shutdown_timeout=10)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/api/v1/tasks", json={"task_type": "t"}) as resp:
            tid = (await resp.json())["result"]["task_id"]

        async def poll() -> tuple[int, dict[str, Any]]:
            async with session.get(f"{url}/api/v1/tasks/{tid}?wait=60") as resp:
                return resp.status, await resp.json()

        polls = [asyncio.ensure_future(poll()) for _ in range(5)]
        tracker = taskd.web.get_tracker(app)

        async def parked() -> bool:
            return (await tracker.stats())["waiters"] == 5

        await eventually(parked)
        cleanup = asyncio.ensure_future(runner.cleanup())
        answers = await asyncio.wait_for(asyncio.gather(*polls), 5)
        await asyncio.wait_for(cleanup, 5)
    # Every poll got its latest record, 200, not a dropped connection.
    assert [(s, b["result"]["status"]) for s, b in answers] == [(200, "pending")] * 5


async def test_serve_exits_promptly_with_a_thousand_long_polls(tmp_path: Path) -> None:
    async with Service(tmp_path, "--log-level", "WARNING") as s:
        tid = http("POST", s.url + "/api/v1/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def poll() -> int:
                async with session.get(f"{s.url}/api/v1/tasks/{tid}?wait=60") as resp:
                    await resp.read()
                    return resp.status

            polls = [asyncio.ensure_future(poll()) for _ in range(1000)]

            async def parked() -> bool:  # every poll is registered with the actor
                async with session.get(s.url + "/metrics") as resp:
                    text = await resp.text()
                return re.search(r"^taskd_waiters 1000\.0$", text, re.M) is not None

            await eventually(parked, 30)
            start = time.monotonic()
            s.send(signal.SIGTERM)
            statuses = await asyncio.wait_for(asyncio.gather(*polls), 30)
            assert s.proc is not None
            code = await asyncio.to_thread(s.proc.wait, 30)
            elapsed = time.monotonic() - start
            await asyncio.to_thread(s.stop)  # closes its log
    assert statuses == [200] * 1000
    assert code == 0
    # close_timeout is 5 s; the promise is close_timeout + 2 s, not the polls' 60 s.
    assert elapsed < 7.0, elapsed


# --- 3. event ids across restarts -------------------------------------------------------


async def _first_event(session: aiohttp.ClientSession, url: str, last: str | None) -> Any:
    headers = {"Last-Event-ID": last} if last else {}
    async with session.get(url, headers=headers) as resp:
        if resp.status == 204:
            return 204, None, None
        event_id = data = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and data is not None:
                return resp.status, event_id, data
    raise AssertionError("no event")


async def test_event_ids_stay_unique_across_restarts(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    async with aiohttp.ClientSession() as session:
        async with Service(tmp_path, "--db", db) as s:
            ids = [
                http("POST", s.url + "/api/v1/tasks", {"task_type": "t"})[1]["result"]["task_id"]
                for _ in range(5)
            ]
            target = ids[0]
            http("POST", f"{s.url}/api/v1/tasks/{target}/start")
            _, before, rec = await _first_event(
                session, f"{s.url}/api/v1/tasks/{target}/events", None
            )
            assert rec["status"] == "running"
        async with Service(tmp_path, "--db", db, port=s.port) as s2:
            # a global subscriber makes the new process keep its replay buffer
            glob = asyncio.ensure_future(_first_event(session, f"{s2.url}/api/v1/events", None))

            async def subscribed() -> bool:
                async with session.get(s2.url + "/metrics") as resp:
                    return "taskd_subscriptions 1.0" in await resp.text()

            await eventually(subscribed)
            http("POST", f"{s2.url}/api/v1/tasks/{target}/complete", {"result": 1})
            for other in ids[1:]:
                http("POST", f"{s2.url}/api/v1/tasks/{other}/cancel")
            _, after, _ = await asyncio.wait_for(glob, 5)
            status, _, rec = await _first_event(
                session, f"{s2.url}/api/v1/tasks/{target}/events", before
            )
    assert int(after) > int(before)  # ids keep increasing across the restart
    # Resuming with a pre-restart id gets the current state, not "nothing missed".
    assert status == 200 and rec["status"] == "completed"


# --- 4. webhook secrets and allow-list entries ----------------------------------------


def test_unpadded_whsec_secrets_verify_with_the_reference_library() -> None:
    key = bytes(range(200, 232))  # 32 bytes: 43 base64 characters unpadded
    padded = base64.b64encode(key).decode()
    # URL-safe secrets are refused (tests/test_push.py): the library drops "-" and "_".
    for text in (padded, padded.rstrip("=")):
        secret = "whsec_" + text
        hooks = taskd.Webhooks(secret=secret)  # accepted
        assert hooks.secret == secret
        body = b'{"task_id":"x"}'
        ts = int(time.time())
        sig = taskd._webhooks.sign(secret, "msg_1", ts, body)
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": sig}
        Webhook(secret).verify(body, headers)  # raises if it does not match


def test_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="not base64"):
        taskd.Webhooks(secret="whsec_not base64 at all!")
    out = cli("serve", "--webhook-secret", "whsec_%%%", "--port", str(free_port()))
    assert out.returncode == 1 and "not base64" in out.stderr and "Traceback" not in out.stderr


def test_plain_secret_warns_at_start(tmp_path: Path) -> None:
    with Service(tmp_path, "--webhook-secret", "plain-secret", "--webhook-allow", "::1") as s:
        pass
    assert "raw UTF-8 bytes" in s.log()


def test_ipv6_allow_list_entries() -> None:
    hooks = taskd.Webhooks(secret="s", allow=("::1", "[::1]:9000", "[2001:db8::1]"))
    assert hooks.check_url("http://[::1]:1234/h")
    assert hooks.check_url("http://[::1]:9000/h")
    assert hooks.check_url("https://[2001:db8::1]/h")
    with pytest.raises(ValueError):
        hooks.check_url("http://[::2]:9000/h")
    for bad in ("[::1", "::zz", "[::1]x", "host:port:x:y", "a b"):
        with pytest.raises(ValueError, match="allow-list"):
            taskd.Webhooks(secret="s", allow=(bad,))
    out = cli("serve", "--webhook-secret", "s", "--webhook-allow", "[::1", "--port", "1")
    assert out.returncode == 1 and "allow-list" in out.stderr


# --- 5. empty filter values -------------------------------------------------------------


async def test_empty_filter_values_mean_no_filter(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(taskd.web.create_app(close_timeout=0.2))
    for task_type in ("a", "b"):
        await client.post("/api/v1/tasks", json={"task_type": task_type, "resource_id": "r"})
    resp = await client.get("/api/v1/tasks?task_type=&status=&resource_id=")
    assert resp.status == 200
    assert len((await resp.json())["result"]) == 2
    resp = await client.get("/api/v1/tasks?status=,pending,")
    assert len((await resp.json())["result"]) == 2
    await _envelope(await client.get("/api/v1/tasks?limit=0"), 400, "INVALID_ARGUMENT")


# --- 6. close_timeout=0 -------------------------------------------------------------------


async def test_close_timeout_zero_cancels_at_once() -> None:
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    tracker = taskd.Tracker(close_timeout=0)
    async with tracker:
        handle = await tracker.spawn(work(), task_type="t")

        async def running() -> bool:
            return (await tracker.stats())["runners"] == 1

        await eventually(running)
        # aclose must not wait for the coroutine: it never finishes by itself.
        await asyncio.wait_for(tracker.aclose(), 5)
    assert cancelled.is_set()
    with pytest.raises(asyncio.CancelledError):
        await handle


# --- 7. one error table -------------------------------------------------------------------


def test_error_table_holds_the_documented_codes_and_the_openapi_document_lists_them() -> None:
    documented = {  # docs/http-api.md
        "INVALID_ARGUMENT": 400,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404,
        "CONFLICT": 409,
        "FAILED_PRECONDITION": 409,
        "PAYLOAD_TOO_LARGE": 413,
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
    }
    table = {e.code: e.http_status for e in _errors.ERRORS}
    assert documented.items() <= table.items()
    assert {c for c, e in _errors.BY_CODE.items() if e.retry_after} == {
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
    doc = taskd._openapi.document(prefix="/api/v1", auth=True)
    schemas: Any = doc["components"]
    enum = schemas["schemas"]["ErrorEnvelope"]["properties"]["error"]["properties"]["code"]
    assert set(enum["enum"]) == set(table)


@pytest.mark.parametrize(
    "exc",
    [
        taskd.TaskNotFound("t1"),
        taskd.TaskNotFound("t1", "minted elsewhere: use --redis"),
        taskd.TaskConflict("t1", "commit", "s1"),
        taskd.InvalidTransition("t1", "cancelled", "cancel"),
        taskd.QuotaExceeded("alice", 3),
        taskd.TrackerFull("full"),
        taskd.TrackerClosed("closed"),
        taskd.StoreError("disk full"),
    ],
)
def test_exceptions_rebuild_from_code_and_details(exc: taskd.TaskdError) -> None:
    row = _errors.BY_CODE[exc.code]
    assert row.http_status == exc.http_status
    details = json.loads(json.dumps(exc.error_details()))
    rebuilt = _errors.error_from_wire(exc.code, str(exc), details)
    assert type(rebuilt) is type(exc)
    assert str(rebuilt) == str(exc)
    assert rebuilt.error_details() == exc.error_details()


async def test_client_raises_what_the_server_raised(
    tmp_path: Path, make_client: MakeTaskdClient
) -> None:
    async with Service(tmp_path) as s:
        async with make_client(s.url) as client:
            rec = await client.create("commit", resource_id="s1")
            with pytest.raises(taskd.TaskConflict) as conflict:
                await client.create("commit", resource_id="s1")
            assert str(conflict.value) == (
                f"an active 'commit' task for resource 's1' already exists: {rec.task_id}"
            )
            cancelled = await client.cancel(rec.task_id)
            assert await client.cancel(rec.task_id) == cancelled  # idempotent
            done = await client.create("commit")
            await client.start(done.task_id)
            await client.complete(done.task_id, 1)
            with pytest.raises(taskd.InvalidTransition) as again:
                await client.cancel(done.task_id)
            assert str(again.value) == f"cannot cancel task '{done.task_id}': it is completed"
            with pytest.raises(ApiError) as bad:
                await client.list(limit=0)
            assert isinstance(bad.value, taskd.TaskdError) and bad.value.code == "INVALID_ARGUMENT"
        out = await asyncio.to_thread(cli, "cancel", done.task_id, "--url", s.url)
    assert out.returncode == 3
    assert out.stderr.strip() == (
        f"taskd: cannot cancel task '{done.task_id}': it is completed [FAILED_PRECONDITION]"
    )


def test_client_errors_join_the_tree() -> None:
    from taskd.client import ServerUnreachable

    assert issubclass(ApiError, taskd.TaskdError)
    assert issubclass(ServerUnreachable, taskd.TaskdError)
    assert issubclass(taskd.StoreError, taskd.TaskdError)
    assert not hasattr(taskd.web, "ApiError") and hasattr(taskd.web, "RequestError")


# --- 8. CLI -------------------------------------------------------------------------------


def test_list_prints_whole_ids_on_80_columns(tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        ids = [
            http(
                "POST",
                s.url + "/api/v1/tasks",
                {
                    "task_type": "a_rather_long_type_name",
                    "resource_id": f"resource-{i}-" + "x" * 30,
                },
            )[1]["result"]["task_id"]
            for i in range(3)
        ]
        http("POST", f"{s.url}/api/v1/tasks/{ids[0]}/progress", {"message": "m" * 80})
        out = cli("list", "--url", s.url, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    for tid in ids:
        assert tid in out.stdout  # whole, copyable into taskd wait


@pytest.mark.parametrize("command", [["list"], ["get", "x"], ["serve"]])
def test_bad_environment_value_is_one_line_naming_it(command: list[str]) -> None:
    out = cli(*command, env={"TASKD_PORT": "abc", "TASKD_CANCEL_GRACE": "abc"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and ("TASKD_PORT" in lines[0] or "TASKD_CANCEL_GRACE" in lines[0])


def test_serve_start_failures_exit_1(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with Service(tmp_path, "--db", str(db)) as s:
        second = cli("serve", "--db", str(db), "--port", str(free_port()))
        assert second.returncode == 1 and "in use" in second.stderr
        busy = cli("serve", "--port", str(s.port))
        assert busy.returncode == 1 and "cannot listen" in busy.stderr
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    junk = cli("serve", "--db", str(tmp_path / "junk.db"), "--port", str(free_port()))
    assert junk.returncode == 1 and "Traceback" not in junk.stderr


def test_every_subcommand_help_has_a_description_and_defaults() -> None:
    from taskd.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        assert p.description, name
        for action in p._actions:
            if action.dest in ("help",) or not action.option_strings:
                continue
            assert action.help, (name, action.dest)
        text = " ".join(p.format_help().split())
        if name == "serve":
            for env in ("TASKD_HOST", "TASKD_PORT", "TASKD_DB", "TASKD_TOKENS"):
                assert env in text
            assert "(default: 8080)" in text and "(default: 127.0.0.1)" in text
        else:
            assert "TASKD_URL" in text and "(default: http://127.0.0.1:8080)" in text


def test_list_says_when_more_pages_exist(tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        for _ in range(3):
            http("POST", s.url + "/api/v1/tasks", {"task_type": "t"})
        first = cli("list", "--url", s.url, "--limit", "2")
        token = re.search(r"--page-token (\S+)", first.stderr)
        assert token is not None, first.stderr
        second = cli("list", "--url", s.url, "--limit", "2", "--json", "--page-token", token[1])
    assert first.stdout.count("│ pending") == 2
    assert len(json.loads(second.stdout)["tasks"]) == 1 and "--page-token" not in second.stderr


# --- 9. cancel_grace ------------------------------------------------------------------------


async def test_unacknowledged_cancel_becomes_cancelled_after_grace(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock, cancel_grace=60) as tracker:
        rec = await tracker.create("t")
        await tracker.start(rec.task_id)
        assert (await tracker.cancel(rec.task_id)).status == "cancelling"
        clock.advance(30)
        await tracker.progress(rec.task_id, 0.5)  # a live worker reports: grace restarts
        clock.advance(59)
        got = await tracker.get(rec.task_id)
        assert got is not None and got.status == "cancelling"
        clock.advance(2)
        got = await tracker.get(rec.task_id)
    assert got is not None and got.status == "cancelled"
    assert got.error == "cancel not acknowledged"


async def test_cancel_grace_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "t.db"
    async with taskd.Tracker(clock=clock, store=taskd.SQLiteStore(db)) as tracker:
        rec = await tracker.create("t")
        await tracker.start(rec.task_id)
        await tracker.cancel(rec.task_id)
    clock.advance(61)
    async with taskd.Tracker(clock=clock, store=taskd.SQLiteStore(db)) as tracker:
        got = await tracker.get(rec.task_id)
    assert got is not None and (got.status, got.error) == ("cancelled", "cancel not acknowledged")


def test_serve_cancel_grace_flag(tmp_path: Path) -> None:
    with Service(tmp_path, "--cancel-grace", "0.3") as s:
        tid = http("POST", s.url + "/api/v1/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        http("POST", f"{s.url}/api/v1/tasks/{tid}/start")
        assert http("POST", f"{s.url}/api/v1/tasks/{tid}/cancel")[1]["result"]["status"] == (
            "cancelling"
        )
        _, body = http("GET", f"{s.url}/api/v1/tasks/{tid}?wait=10")
    assert body["result"]["status"] == "cancelled"
    assert body["result"]["error"] == "cancel not acknowledged"


# --- 10. docs snippets run as written ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_cli_doc_client_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = [b for b in _python_blocks(ROOT / "docs/cli.md") if "TaskdClient" in b]
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    with Service(tmp_path) as s:
        out = cli_script(script, {"TASKD_URL": s.url})
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout


def cli_script(script: Path, env: dict[str, str]) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_readme_embedding_example_binds_loopback_on_another_port() -> None:
    (example,) = [b for b in _python_blocks(ROOT / "README.md") if "run_app" in b]
    compile(example, "README.md", "exec")
    call = re.search(r"web\.run_app\((.*)\)", example)
    assert call is not None
    assert 'host="127.0.0.1"' in call[1] and "port=8080" not in call[1] and "port=" in call[1]
    readme = (ROOT / "README.md").read_text()
    walkthrough = readme[readme.index("## A walkthrough") :]
    assert "--port 8090" in walkthrough or "stop the demo" in walkthrough


def test_embedding_doc_lists_every_setup_parameter() -> None:
    text = (ROOT / "docs/embedding.md").read_text()
    names = set(taskd.web.Options.__annotations__) | {"dashboard"}
    for name in names:
        assert f"`{name}`" in text, name
    assert "/health" in text and "/metrics" in text


# --- 11. small things a user sees -------------------------------------------------------------


def test_redaction_keeps_the_closing_parenthesis() -> None:
    assert taskd.redact("failed (Authorization: Bearer abc123def456)") == (
        "failed (Authorization: Bearer [REDACTED])"
    )


def test_wait_on_a_cancelled_task_prints_the_status_once(tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        tid = http("POST", s.url + "/api/v1/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        http("POST", f"{s.url}/api/v1/tasks/{tid}/cancel")
        out = cli("wait", tid, "--url", s.url)
    assert out.returncode == 2
    assert "cancelled: cancelled" not in out.stdout and "cancelled" in out.stdout


def test_log_lines_name_taskd_once(tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        pass
    assert "taskd: taskd:" not in s.log() and "INFO taskd: stopped" in s.log()


async def test_event_streams_say_no_store(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(taskd.web.create_app(close_timeout=0.2))
    resp = await client.get("/api/v1/events")
    assert resp.headers["Cache-Control"] == "no-store"
    resp.close()


async def test_completed_task_drops_its_stage_message(tracker: taskd.Tracker) -> None:
    rec = await tracker.create("t")
    await tracker.start(rec.task_id)
    await tracker.progress(rec.task_id, 0.5, message="halfway")
    done = await tracker.complete(rec.task_id, 1)
    assert (done.progress, done.message) == (1.0, None)
    other = await tracker.create("t")
    await tracker.start(other.task_id)
    await tracker.progress(other.task_id, 0.5, message="extracting")
    failed = await tracker.fail(other.task_id, "boom")
    assert failed.message == "extracting"  # where it stopped
