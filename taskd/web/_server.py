"""Connection hygiene for ``taskd serve``: read and keep-alive timeouts, a cap on open
connections below the file-descriptor limit, and a quiet log when descriptors run out
anyway. aiohttp glue, used by the CLI only.

aiohttp closes a connection that stays idle for ``keepalive_timeout`` (from its
start, too), but has no bound on how long a request may take to *arrive*: a client
that sends one header byte a second (slowloris) or trickles its body holds a
connection and a file descriptor for as long as it likes. ``ServeRunner`` gives each
request ``read_timeout`` seconds from its first byte until its headers and body are
all in; past that the connection is closed. Handlers that take long (long-polls,
event streams) are not affected: their request arrived long before.

The timeout alone does not save the service from many such clients at once: with every
file descriptor held by a half-open request, ``accept`` fails and nobody is served —
``/health`` included — until the read timeouts free some. So ``ServeRunner`` also caps
open connections at ``max_connections``, kept below the descriptor limit
(``connection_cap``) so that Redis, SQLite and webhooks keep descriptors too. At the
cap, each new connection closes the oldest one that is not inside a handler (a
half-open request, an idle keep-alive): an old slow client gives way to a new one,
and a request that arrives whole is served. Only when every connection is inside a
handler (long-polls, event streams) is the new one closed instead.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ._errors import EnvelopeHandler

__all__ = ["BACKLOG", "ServeRunner", "connection_cap", "quiet_accept_errors", "raise_fd_limit"]

log = logging.getLogger("taskd")

_ACCEPT_ERROR: Final = "socket.accept() out of system resource"
#: The listening socket's backlog. asyncio accepts up to this many connections in one
#: go before any of them is seen (and counted) here, so the cap leaves that much room.
BACKLOG: Final = 128
#: Descriptors kept out of the connection cap besides: Redis and SQLite connections,
#: webhook deliveries, the listening sockets, the event loop's own, log files.
_HEADROOM_MIN: Final = 64


class _TimedHandler(EnvelopeHandler):
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, _TimedServer):
            manager.admit(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        manager = self._manager
        if isinstance(manager, _TimedServer):
            manager.release(self)
        super().connection_lost(exc)

    def busy(self) -> bool:
        """Inside a handler (a request being answered, a long-poll, a stream)."""
        return self._current_request is not None

    def drop(self) -> None:
        """Close at once: the connection gives its descriptor back."""
        self.force_close()
        if self.transport is not None:
            self.transport.abort()


class _TimedServer(web.Server):
    read_timeout: float
    max_connections: int | None
    _open: OrderedDict[_TimedHandler, None]
    _dropped: int
    _dropped_logged: float

    def __call__(self) -> RequestHandler:
        return _TimedHandler(self, loop=self._loop, read_timeout=self.read_timeout, **self._kwargs)

    def admit(self, handler: _TimedHandler) -> None:
        """A connection opened: at the cap, close the oldest one that is not inside a
        handler (or this one, if all are)."""
        self._open[handler] = None
        cap = self.max_connections
        if cap is None or len(self._open) <= cap:
            return
        victim = handler
        for _ in range(len(self._open)):
            oldest = next(iter(self._open))
            if oldest is handler:
                break
            if not oldest.busy():
                victim = oldest
                break
            # Busy (a stream, a long-poll): look past it, and next time too.
            self._open.move_to_end(oldest)
        self._open.pop(victim, None)
        victim.drop()
        self._note_drop(cap)

    def release(self, handler: _TimedHandler) -> None:
        """A connection closed."""
        self._open.pop(handler, None)

    def _note_drop(self, cap: int) -> None:
        # One WARNING a second at most: under a flood this runs for every accept.
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged >= 1.0:
            log.warning(
                "%d connections open (the cap, --max-connections): closed %d of the oldest "
                "idle or half-open ones in the last second",
                cap,
                self._dropped,
            )
            self._dropped_logged = now
            self._dropped = 0


class ServeRunner(web.AppRunner):
    """``web.AppRunner`` with ``read_timeout`` (seconds for a request to arrive whole),
    aiohttp's own ``keepalive_timeout`` (seconds an idle connection is kept) and
    ``max_connections`` (open connections at most; None: no cap)."""

    def __init__(
        self,
        app: web.Application,
        *,
        read_timeout: float,
        keepalive_timeout: float,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._read_timeout = read_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its Server; only its connection factory changes.
        server.__class__ = _TimedServer
        assert isinstance(server, _TimedServer)
        server.read_timeout = self._read_timeout
        server.max_connections = self._max_connections
        server._open = OrderedDict()
        server._dropped = 0
        server._dropped_logged = 0.0
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


def connection_cap(fd_limit: int, requested: int | None = None) -> int:
    """The most connections to keep open under a limit of ``fd_limit`` descriptors:
    the limit minus a headroom (the backlog, 64, and 1/16 of the limit), or
    ``requested`` if lower. A ``requested`` cap above that is lowered to it, with a
    WARNING."""
    cap = max(1, fd_limit - BACKLOG - _HEADROOM_MIN - fd_limit // 16)
    if requested is None:
        return cap
    if requested > cap:
        log.warning(
            "--max-connections %d is more than the open-file limit (%d) leaves room for: "
            "using %d (raise the limit: ulimit -n)",
            requested,
            fd_limit,
            cap,
        )
        return cap
    return requested
