"""White-box tests: private mechanisms that have no public face.

The rest of the suite provokes behaviour through public means and observes it
through public state (``Tracker`` methods and counts, ``stats()``, the HTTP API,
``/metrics``, a subprocess's output), so that it keeps holding whatever the inside
looks like. What is here cannot be seen that way: a cache whose only effect is
speed. These tests read internals on purpose, and are the only ones that do: when
an internal changes shape, this file is the one to update, and no other test may
join it unless what it checks is likewise invisible from outside.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import taskd
import taskd.web

from .conftest import Engine

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
API = "/api/v1"


@pytest.fixture
async def client(aiohttp_client: MakeClient, engine: Engine) -> Client:
    return await aiohttp_client(taskd.web.create_app(close_timeout=0.2, **engine))


async def test_responses_are_rendered_once_per_record(client: Client) -> None:
    """The web layer's render cache (``taskd.web._context``): a record version is
    turned into JSON once, however often it is read; its only effect is speed."""
    from taskd.web._context import _state_of

    resp = await client.post(f"{API}/tasks", json={"task_type": "reindex"})
    assert resp.status == 201, await resp.text()
    tid = (await resp.json())["result"]["task_id"]
    body = await (await client.get(f"{API}/tasks/{tid}")).json()
    assert body["result"]["task_id"] == tid
    state = _state_of(client.app)
    tracker = taskd.web.get_tracker(client.app)
    rec = await tracker.get(tid)
    assert rec is not None
    # cached: the very same bytes object, the answer's body with its envelope
    assert state.render_ok(rec) is state.render_ok(rec)
    assert state.render_ok(rec) == b'{"status":"ok","result":' + state.render(rec) + b"}\n"
    assert json.loads(state.render(rec)) == body["result"]
    await client.post(f"{API}/tasks/{tid}/start")
    newer = await tracker.get(tid)
    assert newer is not None and b'"running"' in state.render(newer)  # a new version renders anew
