"""examples/session_commit.py (aiohttp) and examples/fastapi_app.py (FastAPI, served
by uvicorn): the reference's nine integration scenarios, on taskd, on both."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from .asgi_server import AsgiClient


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parent.parent / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


session_commit = _load("session_commit")
fastapi_app = _load("fastapi_app")

Client = TestClient[web.Request, web.Application]
API = "/api/v1"


class ControlledCommit:
    """A commit function the test releases by hand, recording its calls."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[str] = []
        self.fail_with: BaseException | None = None

    async def __call__(self, session_id: str) -> dict[str, Any]:
        self.calls.append(session_id)
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return {"memories_extracted": 7}


@pytest.fixture
def commit() -> ControlledCommit:
    return ControlledCommit()


@pytest.fixture(params=["aiohttp", "fastapi"])
async def client(
    request: pytest.FixtureRequest,
    aiohttp_client: Callable[..., Awaitable[Client]],
    commit: ControlledCommit,
) -> AsyncIterator[Any]:
    if request.param == "aiohttp":
        yield await aiohttp_client(session_commit.create_app(commit=commit))
        return
    served = await AsgiClient(fastapi_app.create_app(commit=commit)).start()
    try:
        yield served
    finally:
        await served.close()


async def start_background(client: Client, sid: str) -> dict[str, Any]:
    resp = await client.post(f"{API}/sessions/{sid}/commit?wait=false")
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    assert resp.headers["Location"] == f"{API}/tasks/{body['result']['task_id']}"
    return body


async def poll_until_done(client: Client, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"{API}/tasks/{task_id}?wait=10")
    body = await resp.json()
    assert body["result"]["status"] in ("completed", "failed"), body
    return body["result"]


# 1
async def test_async_commit_returns_task_id(client: Client, commit: ControlledCommit) -> None:
    body = await start_background(client, "s1")
    assert body["status"] == "ok"
    result = body["result"]
    assert result["session_id"] == "s1" and result["status"] == "accepted"
    assert isinstance(result["task_id"], str) and result["task_id"]
    commit.gate.set()


# 2
async def test_poll_until_completed_gives_commit_result(
    client: Client, commit: ControlledCommit
) -> None:
    task_id = (await start_background(client, "s1"))["result"]["task_id"]
    running = await (await client.get(f"{API}/tasks/{task_id}")).json()
    assert running["result"]["status"] == "running"
    commit.gate.set()
    rec = await poll_until_done(client, task_id)
    assert rec["status"] == "completed"
    assert rec["result"] == {"memories_extracted": 7}
    assert rec["task_type"] == "session_commit" and rec["resource_id"] == "s1"


# 3
async def test_failed_commit_is_reported_with_redacted_error(
    client: Client, commit: ControlledCommit
) -> None:
    commit.fail_with = RuntimeError("vector store rejected key sk-abcdefghijklmnopqrstuvwx")
    task_id = (await start_background(client, "s1"))["result"]["task_id"]
    commit.gate.set()
    rec = await poll_until_done(client, task_id)
    assert rec["status"] == "failed"
    assert "sk-abcdefghijklmnop" not in rec["error"] and "[REDACTED]" in rec["error"]
    assert rec["result"] is None


# 4 (and the 409 with details.task_id)
async def test_duplicate_background_commit_is_409(client: Client, commit: ControlledCommit) -> None:
    first = (await start_background(client, "s1"))["result"]["task_id"]
    resp = await client.post(f"{API}/sessions/s1/commit?wait=false")
    assert resp.status == 409
    body = await resp.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "CONFLICT"
    assert "already has a commit in progress" in body["error"]["message"]
    assert body["error"]["details"]["task_id"] == first
    assert commit.calls == ["s1"]
    commit.gate.set()


# 5
async def test_wait_true_is_the_default_and_returns_result_inline(
    client: Client, commit: ControlledCommit
) -> None:
    commit.gate.set()
    resp = await client.post(f"{API}/sessions/s1/commit")
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "status": "ok",
        "result": {"session_id": "s1", "status": "committed", "memories_extracted": 7},
    }
    assert "task_id" not in body["result"]


# 6
async def test_wait_true_while_background_active_is_409(
    client: Client, commit: ControlledCommit
) -> None:
    first = (await start_background(client, "s1"))["result"]["task_id"]
    resp = await client.post(f"{API}/sessions/s1/commit?wait=true")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "CONFLICT"
    assert "already has a commit in progress" in body["error"]["message"]
    assert body["error"]["details"]["task_id"] == first
    commit.gate.set()


# 7
async def test_new_commit_allowed_after_previous_finished(
    client: Client, commit: ControlledCommit
) -> None:
    commit.gate.set()
    first = (await start_background(client, "s1"))["result"]["task_id"]
    await poll_until_done(client, first)
    second = (await start_background(client, "s1"))["result"]["task_id"]
    assert second != first
    # a different session was never blocked
    other = (await start_background(client, "s2"))["result"]["task_id"]
    await poll_until_done(client, other)


# 8
async def test_list_tasks_with_filters(client: Client, commit: ControlledCommit) -> None:
    commit.gate.set()
    a = (await start_background(client, "s1"))["result"]["task_id"]
    b = (await start_background(client, "s2"))["result"]["task_id"]
    await poll_until_done(client, a)
    await poll_until_done(client, b)
    body = await (await client.get(f"{API}/tasks?task_type=session_commit&limit=50")).json()
    assert [r["task_id"] for r in body["result"]] == [b, a]
    body = await (await client.get(f"{API}/tasks?resource_id=s1")).json()
    assert [r["task_id"] for r in body["result"]] == [a]
    body = await (await client.get(f"{API}/tasks?status=failed")).json()
    assert body["result"] == []


# 9
async def test_unknown_task_is_404_in_the_envelope(client: Client) -> None:
    resp = await client.get(f"{API}/tasks/does-not-exist")
    assert resp.status == 404
    body = await resp.json()
    assert body["status"] == "error" and body["error"]["code"] == "NOT_FOUND"


async def test_bad_wait_value_is_400(client: Client) -> None:
    resp = await client.post(f"{API}/sessions/s1/commit?wait=maybe")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"


async def test_default_commit_runs(aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    client = await aiohttp_client(session_commit.create_app())
    resp = await client.post(f"{API}/sessions/abc/commit")
    body = await resp.json()
    assert resp.status == 200 and body["result"]["status"] == "committed"


def test_the_fastapi_example_runs_under_uvicorn(tmp_path: Path) -> None:
    """``uvicorn examples.fastapi_app:app``, as its docstring says: a real process, a
    commit in the background, its task polled through the mounted task API."""
    import json
    import subprocess
    import urllib.request

    from .service import free_port, wait_for

    port = free_port()
    root = Path(__file__).parent.parent
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(base + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def up() -> bool:
        try:
            return call("GET", "/health")[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, 20)
        status, body = call("POST", f"{API}/sessions/s9/commit?wait=false")
        assert status == 202, body
        tid = body["result"]["task_id"]
        status, body = call("GET", f"{API}/tasks/{tid}?wait=10")
        assert status == 200 and body["result"]["status"] == "completed", body
        assert body["result"]["result"]["memories_extracted"] >= 1
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    # (uvicorn re-raises SIGTERM once it has shut down cleanly: -15)
    text = (tmp_path / "uvicorn.log").read_text()
    assert proc.returncode in (0, -15) and "Application shutdown complete" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text
