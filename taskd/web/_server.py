"""Connection hygiene for ``taskd serve``: read and keep-alive timeouts, and a quiet
log when file descriptors run out. aiohttp glue, used by the CLI only.

aiohttp closes a connection that stays idle for ``keepalive_timeout`` (from its
start, too), but has no bound on how long a request may take to *arrive*: a client
that sends one header byte a second (slowloris) or trickles its body holds a
connection and a file descriptor for as long as it likes. ``ServeRunner`` gives each
request ``read_timeout`` seconds from its first byte until its headers and body are
all in; past that the connection is closed. Handlers that take long (long-polls,
event streams) are not affected: their request arrived long before.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ServeRunner", "quiet_accept_errors", "raise_fd_limit"]

log = logging.getLogger("taskd")

_ACCEPT_ERROR: Final = "socket.accept() out of system resource"


class _TimedHandler(RequestHandler):
    """A connection whose requests must arrive whole within ``read_timeout``.

    One lazy timer per connection, not one per request: a request notes when its
    first byte came and clears the note once it is in; the timer, when it fires,
    closes the connection if the note is older than ``read_timeout``, re-arms for
    the rest if it is younger, and lapses if there is none (the next request's
    first byte arms it again). Arming and cancelling a timer per request cost the
    hottest route ~8% of its rate.
    """

    __slots__ = ("_read_payload", "_read_started", "_read_timeout", "_read_timer")

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_started: float | None = None
        self._read_payload: Any = None

    def data_received(self, data: bytes) -> None:
        if self._read_started is None and data:
            # The first byte of a request: from now, it has read_timeout to arrive.
            self._read_started = started = self._loop.time()
            if self._read_timer is None:
                self._read_timer = self._loop.call_at(started + self._read_timeout, self._check)
        before = len(self._messages)
        super().data_received(data)
        if len(self._messages) > before:
            self._read_payload = self._messages[-1][1]
        payload = self._read_payload
        if payload is not None and payload.is_eof():
            self._read_started = None
            self._read_payload = None

    def _check(self) -> None:
        self._read_timer = None
        started = self._read_started
        if started is None:
            return
        deadline = started + self._read_timeout
        if self._loop.time() < deadline:
            self._read_timer = self._loop.call_at(deadline, self._check)
            return
        log.debug("closing a connection whose request did not arrive in %gs", self._read_timeout)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)


class _TimedServer(web.Server):
    read_timeout: float

    def __call__(self) -> RequestHandler:
        return _TimedHandler(self, loop=self._loop, read_timeout=self.read_timeout, **self._kwargs)


class ServeRunner(web.AppRunner):
    """``web.AppRunner`` with ``read_timeout`` (seconds for a request to arrive whole)
    and aiohttp's own ``keepalive_timeout`` (seconds an idle connection is kept)."""

    def __init__(
        self,
        app: web.Application,
        *,
        read_timeout: float,
        keepalive_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._read_timeout = read_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its Server; only its connection factory changes.
        server.__class__ = _TimedServer
        assert isinstance(server, _TimedServer)
        server.read_timeout = self._read_timeout
        return server


class _OncePerSecond(logging.Filter):
    """Let asyncio's "out of file descriptors" error through once a second, on one
    line: under a flood it would otherwise log a traceback for every attempt."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_ACCEPT_ERROR):
            return True
        now = time.monotonic()
        if now - self._last < 1.0:
            self._dropped += 1
            return False
        self._last = now
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = "%s: %s (%d more in the last second); raise the limit (ulimit -n)"
        record.args = (_ACCEPT_ERROR, exc, self._dropped)
        record.exc_info = record.exc_text = None
        self._dropped = 0
        return True


def quiet_accept_errors() -> None:
    """Install the once-a-second filter on asyncio's logger."""
    logging.getLogger("asyncio").addFilter(_OncePerSecond())


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
