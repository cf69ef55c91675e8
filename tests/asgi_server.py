"""An ASGI application (``taskd.asgi``'s, or a FastAPI app that mounts it) served by a
real uvicorn on a free loopback port, behind what the HTTP and push suites use of
aiohttp's ``TestClient``: so the same tests run against both."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvicorn
from yarl import URL

from .service import free_port


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int


class AsgiClient:
    """A uvicorn server of one ``taskd.asgi`` application, and a client session to it
    (``get``, ``post``, … as ``TestClient``'s: paths relative to the server)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.server = Address("127.0.0.1", free_port())
        config = uvicorn.Config(
            app, host=self.server.host, port=self.server.port, log_level="warning", lifespan="on"
        )
        self._uvicorn = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> AsgiClient:
        self._task = asyncio.get_running_loop().create_task(self._uvicorn.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not self._uvicorn.started:  # (uvicorn sets the flag once it listens)
            if self._task.done():
                self._task.result()
            assert loop.time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        self.session = aiohttp.ClientSession()
        return self

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.server.host}:{self.server.port}").join(URL(path))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.session is not None
        return self.session.request(method, self.make_url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def options(self, path: str, **kwargs: Any) -> Any:
        return self.request("OPTIONS", path, **kwargs)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._task is not None:
            self._uvicorn.should_exit = True
            await self._task
            self._task = None
