"""``taskd.asgi`` beyond the HTTP and push suites it shares with ``taskd.web`` (the
``serve`` fixture runs them on it under uvicorn): mounting in a FastAPI app under a
path, the tracker's lifecycle with and without the host's lifespan, and its options
(docs/asgi.md)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

import taskd
import taskd.asgi
import taskd.web

from .asgi_server import AsgiClient

API = "/api/v1"


def state_of(tracker: taskd.Tracker) -> taskd.TrackerState:
    """(read anew each time: the state changes under the test)"""
    return tracker.state


async def test_mounted_under_a_path_in_a_fastapi_app() -> None:
    tracker = taskd.Tracker()
    tasks = taskd.asgi.app(tracker)
    host = FastAPI(lifespan=tasks.lifespan)

    @host.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.mount("/jobs", tasks)
    client = await AsgiClient(host).start()
    try:
        assert tracker.state is taskd.TrackerState.OPEN  # the host's lifespan opened it
        resp = await client.post(f"/jobs{API}/tasks", json={"task_type": "x"})
        assert resp.status == 201, await resp.text()
        tid = (await resp.json())["result"]["task_id"]
        # Location and the OpenAPI document's server path say where it is mounted
        assert resp.headers["Location"] == f"/jobs{API}/tasks/{tid}"
        got = await client.get(f"/jobs{API}/tasks/{tid}")
        assert (await got.json())["result"]["task_id"] == tid
        assert (await (await client.get("/hello")).json()) == {"hello": "world"}
        missing = await client.get(f"/jobs{API}/nowhere")
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "NOT_FOUND"
        wrong = await client.put(f"/jobs{API}/tasks")
        assert wrong.status == 405 and wrong.headers["Allow"] == "DELETE, GET, POST"
        page = await client.get("/jobs/")
        assert page.status == 200 and "text/html" in page.headers["Content-Type"]
        assert f"/jobs{API}" in await page.text()  # the dashboard calls the mounted API
        assert taskd.web.get_tracker(tasks) is tracker  # type: ignore[arg-type]
    finally:
        await client.close()
    assert state_of(tracker) is taskd.TrackerState.CLOSED  # and drained it at shutdown


async def test_a_tracker_is_opened_at_the_first_request_without_a_lifespan() -> None:
    """Mounted in a host whose lifespan does not enter the task API's."""
    tracker = taskd.Tracker()
    host = FastAPI()
    host.mount("/", taskd.asgi.app(tracker))
    client = await AsgiClient(host).start()
    try:
        assert tracker.state is taskd.TrackerState.NEW
        resp = await client.post(f"{API}/tasks", json={"task_type": "x"})
        assert resp.status == 201
        assert state_of(tracker) is taskd.TrackerState.OPEN
    finally:
        await client.close()
        await tracker.aclose()


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="unexpected option"):
        taskd.asgi.app(nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="retention"):
        taskd.asgi.app(taskd.Tracker(), retention=taskd.Retention())
    with pytest.raises(TypeError, match=r"taskd\.Tracker"):
        taskd.asgi.app("not a tracker")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="demo"):
        taskd.asgi.app(demo=True)
    with pytest.raises(ValueError):
        taskd.asgi.app(max_wait=3600)


async def test_an_error_in_an_auth_callback_is_an_envelope_not_a_traceback() -> None:
    def auth(request: Any) -> str:
        raise RuntimeError("the auth backend is down")

    client = await AsgiClient(taskd.asgi.app(auth=auth)).start()
    try:
        resp = await client.get(f"{API}/tasks")
        assert resp.status == 500
        body = await resp.json()
        assert body["error"]["code"] == "INTERNAL" and "Traceback" not in await resp.text()
    finally:
        await client.close()


async def test_the_docs_example_runs() -> None:
    """docs/asgi.md's example, as written, served by uvicorn."""
    import re
    from pathlib import Path

    (block,) = re.findall(
        r"```python\n(.*?)```", (Path(__file__).parent.parent / "docs/asgi.md").read_text(), re.S
    )
    space: dict[str, Any] = {}
    exec(compile(block, "docs/asgi.md", "exec"), space)
    client = await AsgiClient(space["app"]).start()
    try:
        resp = await client.post("/reports")
        tid = (await resp.json())["task_id"]
        done = await client.get(f"{API}/tasks/{tid}?wait=10")
        body = await done.json()
        assert body["result"]["status"] == "completed" and body["result"]["result"] == {"pages": 12}
    finally:
        await client.close()
