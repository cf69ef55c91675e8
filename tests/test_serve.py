"""The standalone service and CLI (docs/cli.md) as real subprocesses on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskd.testing import eventually

from .clients import MakeClient
from .service import Lines, Service, cli, free_port, metric, wait_for

API = "/api/v1"


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def service(tmp_path: Path) -> Any:
    with Service(tmp_path) as s:
        yield s


def waiters(url: str) -> float:
    """Long-polls parked at the server."""
    return metric(url, "taskd_waiters")


def polls(url: str) -> float:
    """``GET /tasks/{task_id}`` answered (a long-poll counts when it is answered)."""
    return metric(url, "taskd_http_requests", method="GET", route=API + "/tasks/{task_id}")


def create(url: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("task_type", "job")
    status, body = http("POST", url + API + "/tasks", fields)
    assert status == 201, body
    return body["result"]


# --- serve -----------------------------------------------------------------------


def test_serve_defaults_to_loopback_and_logs_start_and_stop(tmp_path: Path) -> None:
    s = Service(tmp_path).start()
    assert http("GET", s.url + "/health") == (200, {"status": "ok"})
    assert s.stop(signal.SIGINT) == 0
    log = s.log()
    assert f"serving on http://127.0.0.1:{s.port}" in log
    assert "taskd: stopped" in log
    assert "Traceback" not in log


def test_env_vars_mirror_flags(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "TASKD_PORT": str(port),
        "TASKD_HOST": "127.0.0.1",
        "TASKD_TOKENS": "alice=tok1,bob=tok2",
    }
    with Service(tmp_path, port=port, env=env, pass_port=False) as s:
        assert http("GET", s.url + API + "/tasks")[0] == 401
        status, body = http("POST", s.url + API + "/tasks", {"task_type": "x"}, token="tok1")
        assert status == 201
        assert (
            http("GET", s.url + API + f"/tasks/{body['result']['task_id']}", token="tok2")[0] == 404
        )
        assert len(http("GET", s.url + API + "/tasks", token="tok1")[1]["result"]) == 1


def test_token_flags_bare_token_belongs_to_default(tmp_path: Path) -> None:
    with Service(tmp_path, "--token", "alice=tok1", "--token", "solo") as s:
        assert http("GET", s.url + API + "/tasks", token="wrong")[0] == 401
        assert http("GET", s.url + API + "/tasks", token="solo")[0] == 200
        assert http("GET", s.url + API + "/tasks", token="tok1")[0] == 200
        assert http("GET", s.url + "/health")[0] == 200  # outside the API: no auth


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with Service(tmp_path) as first:
        second = Service(tmp_path, port=first.port).start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(20) != 0  # exits on its own
        second.stop()
        assert "cannot listen" in second.log() and "Traceback" not in second.log()


def test_demo_produces_every_terminal_status(tmp_path: Path) -> None:
    with Service(tmp_path, "--demo") as s:
        seen: set[str] = set()

        def all_seen() -> bool:
            _, body = http("GET", s.url + API + "/tasks?limit=200")
            seen.update(r["status"] for r in body["result"])
            return {"completed", "failed", "cancelled"} <= seen

        wait_for(all_seen, timeout=90, interval=0.5)
        _, body = http("GET", s.url + API + "/tasks?status=failed&limit=200")
        errors = [r["error"] for r in body["result"]]
        assert all(e for e in errors)
        assert not any("hunter2" in e or "AKIAIOSFODNN7EXAMPLE" in e for e in errors)


def test_sigterm_during_running_work_records_them_cancelled(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    s = Service(tmp_path, "--demo", "--db", str(db)).start()
    running: list[str] = []

    def some_running() -> bool:
        _, body = http("GET", s.url + API + "/tasks?status=running")
        running[:] = [r["task_id"] for r in body["result"]]
        return bool(running)

    wait_for(some_running, timeout=20)
    assert s.stop(signal.SIGTERM) == 0
    assert "taskd: stopped" in s.log()
    with Service(tmp_path, "--db", str(db)) as again:
        for task_id in running:
            status, body = http("GET", again.url + API + f"/tasks/{task_id}")
            assert status == 200
            rec = body["result"]
            # finished during the grace period, or cancelled at shutdown: never running
            assert rec["status"] in ("completed", "failed", "cancelled"), rec
            if rec["status"] == "cancelled":
                assert rec["error"] in ("cancelled: tracker shutting down", "cancelled by the demo")


def test_metrics_parse_as_prometheus_text(service: Service) -> None:
    create(service.url, resource_id="r1")
    http("GET", service.url + API + "/tasks/nope")
    with urllib.request.urlopen(service.url + "/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"taskd_tasks", "taskd_mailbox_depth", "taskd_commands", "taskd_http_requests"} <= set(
        families
    )
    samples = {(tuple(sorted(s.labels.items())), s.value) for s in families["taskd_tasks"].samples}
    assert ((("status", "pending"), ("task_type", "job")), 1.0) in samples
    codes = {s.labels["code"] for s in families["taskd_http_requests"].samples}
    assert {"201", "404"} <= codes


# --- client commands -------------------------------------------------------------


def test_cli_list_get_cancel(service: Service) -> None:
    rec = create(service.url, resource_id="r1")
    out = cli("list", "--url", service.url)
    assert out.returncode == 0 and rec["task_id"] in out.stdout and "pending" in out.stdout
    out = cli("list", "--url", service.url, "--json", "--status", "pending")
    assert [r["task_id"] for r in json.loads(out.stdout)["tasks"]] == [rec["task_id"]]
    out = cli("get", rec["task_id"], "--url", service.url, "--json")
    assert json.loads(out.stdout)["resource_id"] == "r1"
    out = cli("get", rec["task_id"], "--url", service.url)
    assert out.returncode == 0 and "resource_id" in out.stdout
    out = cli("cancel", rec["task_id"], "--url", service.url)
    assert out.returncode == 0 and "cancelled" in out.stdout


@pytest.mark.parametrize(("end", "code"), [("complete", 0), ("fail", 1), ("cancel", 2)])
def test_cli_wait_exit_status(service: Service, end: str, code: int) -> None:
    tid = create(service.url)["task_id"]
    http("POST", service.url + API + f"/tasks/{tid}/start")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskd", "wait", tid, "--url", service.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: waiters(service.url) == 1, timeout=20)  # following: a long-poll parked
    http("POST", service.url + API + f"/tasks/{tid}/progress", {"progress": 0.5, "message": "half"})
    answered = polls(service.url)
    # Two more polls answered, and the next one parked: the second began after the
    # progress, so `wait` has seen it, and it kept following.
    wait_for(lambda: polls(service.url) >= answered + 2 and waiters(service.url) == 1, timeout=20)
    assert proc.poll() is None  # still following
    body = (
        {"result": {"n": 1}} if end == "complete" else {"error": "boom"} if end == "fail" else None
    )
    http("POST", service.url + API + f"/tasks/{tid}/{end}", body)
    if end == "cancel":  # running external task: cancelling, then the worker confirms
        http("POST", service.url + API + f"/tasks/{tid}/cancel", {"confirm": True})
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stderr


def test_cli_wait_json_and_timeout(service: Service) -> None:
    tid = create(service.url)["task_id"]
    out = cli("wait", tid, "--url", service.url, "--timeout", "0.5")
    assert out.returncode == 124 and "did not finish" in out.stderr
    http("POST", service.url + API + f"/tasks/{tid}/cancel")
    out = cli("wait", tid, "--url", service.url, "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["status"] == "cancelled"


def test_cli_errors_are_one_line(tmp_path: Path, service: Service) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    for args in (
        ["list", "--url", down],
        ["get", "x", "--url", down],
        ["wait", "x", "--url", down],
    ):
        out = cli(*args)
        assert out.returncode == 3
        assert out.stderr.strip() == f"taskd: cannot reach the server at {down}"
    out = cli("get", "no-such-id", "--url", service.url)
    assert (out.returncode, out.stderr.strip()) == (3, "taskd: no such task: no-such-id")
    out = cli("list", "--url", service.url, "--status", "nope")
    assert out.returncode == 3 and "unknown status" in out.stderr
    with Service(tmp_path, "--token", "alice=tok1") as authed:
        out = cli("list", "--url", authed.url, "--token", "bad")
        assert out.returncode == 3 and "UNAUTHENTICATED" in out.stderr and "--token" in out.stderr
        out = cli("list", "--url", authed.url, env={"TASKD_TOKEN": "tok1"})
        assert out.returncode == 0
    for out in (cli("get", "x", "--url", down), cli("list", "--url", service.url, "--limit", "0")):
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_watch_prints_changes(service: Service) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskd", "watch", "--url", service.url, "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    out = Lines(proc.stdout)
    try:
        # watch follows changes made after it starts
        wait_for(lambda: metric(service.url, "taskd_subscriptions") == 1, timeout=20)
        tid = create(service.url)["task_id"]
        http("POST", service.url + API + f"/tasks/{tid}/cancel")
        wait_for(lambda: len(out.lines) >= 2, timeout=20)  # one line a change, flushed
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    statuses = [json.loads(line)["status"] for line in out.join() if line.strip()]
    assert statuses[:2] == ["pending", "cancelled"]


def test_python_m_taskd_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("taskd ")


# --- the Python client -----------------------------------------------------------


async def test_client_methods(service: Service, make_client: MakeClient) -> None:
    async with make_client(service.url) as client:
        assert await client.health()
        rec = await client.create("job", resource_id="r", metadata={"k": 1})
        assert rec.status.value == "pending" and dict(rec.metadata) == {"k": 1}
        await client.start(rec.task_id)
        assert (await client.progress(rec.task_id, 0.5, message="m")).progress == 0.5
        done = await client.complete(rec.task_id, {"ok": True})
        assert done.result == {"ok": True}
        page = await client.list(status="completed", limit=1)
        assert [r.task_id for r in page.records] == [rec.task_id]
        await client.delete(rec.task_id)
        import taskd

        with pytest.raises(taskd.TaskNotFound):
            await client.get(rec.task_id)
        other = await client.create("job", resource_id="r")
        with pytest.raises(taskd.TaskConflict) as info:
            await client.create("job", resource_id="r")
        assert info.value.task_id == other.task_id
        with pytest.raises(taskd.InvalidTransition):
            await client.complete(other.task_id)
        assert (await client.openapi())["openapi"] == "3.1.0"
        # a tree (docs/trees.md): parent_id and await_children, the children listed
        root = await client.create("import", await_children=True)
        kid = await client.create("part", parent_id=root.task_id)
        assert kid.parent_id == root.task_id
        page = await client.list(parent_id=root.task_id)
        assert [r.task_id for r in page.records] == [kid.task_id]
        await client.start(root.task_id)
        assert (await client.complete(root.task_id, 1)).status.value == "running"
        await client.cancel(kid.task_id)
        done = await client.get(root.task_id)
        assert done.status.value == "completed" and dict(done.children) == {"cancelled": 1}


async def test_client_wait_survives_a_server_restart(
    tmp_path: Path, make_client: MakeClient
) -> None:
    db = tmp_path / "tasks.db"
    s = await asyncio.to_thread(Service(tmp_path, "--db", str(db)).start)
    async with make_client(s.url) as client:
        rec = await client.create("job")
        await client.start(rec.task_id)
        waiter = asyncio.ensure_future(client.wait(rec.task_id, timeout=60, poll_wait=2))

        async def parked() -> bool:
            return await asyncio.to_thread(waiters, s.url) == 1

        await eventually(parked)  # its long-poll is at the server
        assert await asyncio.to_thread(s.stop, signal.SIGKILL) != 0  # the server dies mid long-poll
        # The waiter rides it out: it comes back to the port (here a bare listener that
        # drops it, as a dead server would) rather than failing.
        with socket.create_server(("127.0.0.1", s.port)) as probe:
            probe.setblocking(False)
            conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(probe), 10)
            conn.close()
        assert not waiter.done()
        again = await asyncio.to_thread(Service(tmp_path, "--db", str(db), port=s.port).start)
        try:
            await client.complete(rec.task_id, "after restart")
            final = await asyncio.wait_for(waiter, 30)
            assert final.status.value == "completed" and final.result == "after restart"
        finally:
            await asyncio.to_thread(again.stop)
