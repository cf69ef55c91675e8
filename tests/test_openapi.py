"""The OpenAPI document: valid, exactly the routes served, and schemathesis-clean."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

import taskd.web
from taskd import _openapi

API = "/api/v1"


@pytest.mark.parametrize("auth", [False, True])
def test_document_is_valid_openapi_31(auth: bool) -> None:
    doc = _openapi.document(prefix=API, auth=auth)
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_document_declares_exactly_the_served_routes() -> None:
    app = taskd.web.create_app()
    served: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # "*" routes only answer 405 (with Allow) for undeclared methods
        if path.startswith(API) and route.method != "*":
            served.add((route.method.lower(), path))
    doc = _openapi.document(prefix=API, auth=False)
    declared = {
        (method, path)
        for path, item in doc["paths"].items()  # type: ignore[attr-defined]
        for method in item
    }
    assert declared == served


class LiveServer:
    """The standalone app on a real socket, in a thread with its own event loop
    (schemathesis calls the API synchronously); with ``asgi``, ``taskd.asgi`` under a
    real uvicorn instead."""

    def __init__(self, *, max_wait: float = 60.0, asgi: bool = False) -> None:
        self.max_wait = max_wait
        self.asgi = asgi
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._uvicorn: Any = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self.asgi:
            import uvicorn

            from taskd.asgi import app as asgi_app

            from .service import free_port

            self.port = free_port()
            app = asgi_app(close_timeout=0.1, max_wait=self.max_wait)
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
            self._uvicorn = uvicorn.Server(config)
            self._ready.set()
            self.loop.run_until_complete(self._uvicorn.serve())
            self.loop.close()
            return
        runner = web.AppRunner(taskd.web.create_app(close_timeout=0.1, max_wait=self.max_wait))
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self._ready.wait(10)
        if self._uvicorn is not None:
            from .service import wait_for

            wait_for(lambda: self._uvicorn.started, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        else:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.parametrize("frontend", ["aiohttp", "asgi"])
def test_schemathesis_finds_nothing_against_a_live_server(tmp_path: Path, frontend: str) -> None:
    """Every schemathesis check but positive_data_acceptance (business rules such as
    the dedup 409 refuse some schema-valid input), all phases, zero failures.

    The server caps long-polls at 1 s (the document says so), so that generated
    ``?wait=`` values stay under the client's request timeout.
    """
    with LiveServer(max_wait=1.0, asgi=frontend == "asgi") as server:
        url = f"http://127.0.0.1:{server.port}{API}/openapi.json"
        proc = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                url,
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                # streaming routes: an event stream stays open by design
                "--exclude-path-regex",
                ".*/events$",
                "--max-examples",
                "25",
                "--seed",
                "20261127",
                "--no-color",
                "--report-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
