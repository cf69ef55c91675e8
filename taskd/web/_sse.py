"""Event streams: a subscription written as Server-Sent Events (aiohttp-sse)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .._models import (
    TaskRecord,
)
from ..actor.subscription import Subscription
from ._context import SSE_SEND_TIMEOUT, _State

log = logging.getLogger("taskd.web")
T = TypeVar("T")

# --- event streams ----------------------------------------------------------------------


def _last_event_id(request: web.Request) -> int | None:
    # Event ids are the actor's change sequence (see docs/http-api.md); anything else
    # is no resumption point, and the client gets the current state.
    text = request.headers.get("Last-Event-ID", "").strip()
    return int(text) if text.isdigit() and len(text) < 19 else None


#: Writes a subscription as an event stream (``_stream`` for aiohttp; the ASGI adapter
#: gives its requests their own, as ``sse``).
Streamer = Callable[
    [_State, web.Request, Subscription, TaskRecord | None], Awaitable[web.StreamResponse]
]


def _streamer(request: web.Request) -> Streamer:
    """How to stream to this request: aiohttp's, or the one its adapter brings."""
    own: Streamer | None = getattr(request, "sse", None)
    return _stream if own is None else own


async def _stream(
    state: _State, request: web.Request, sub: Subscription, first: TaskRecord | None
) -> web.StreamResponse:
    """Write a subscription as Server-Sent Events (aiohttp-sse) until it ends.

    The subscription buffers and coalesces on its own, so a slow client only slows
    its own stream; a client that stops reading is cut off after ``SSE_SEND_TIMEOUT``.
    """
    response = EventSourceResponse(
        send_timeout=SSE_SEND_TIMEOUT, ping_interval=state.sse_ping_interval
    )
    # aiohttp-sse sets ``no-cache`` in its constructor; an event stream must not be
    # stored by any cache either, so ours replaces it.
    response.headers["Cache-Control"] = "no-store"
    state.streams.add(sub)
    try:
        await response.prepare(request)
        if first is not None:
            await response.send(state.render(first).decode(), id=str(sub.since))
        while (item := await sub.next()) is not None:
            seq, rec = item
            await response.send(state.render(rec).decode(), id=str(seq))
        response.stop_streaming()
        await response.wait()
    except (ConnectionError, TimeoutError) as exc:
        # The client went away or stopped reading: its stream simply ends. Not an
        # error of ours, and a flood of these must not flood the log.
        log.debug("event stream to %s ended: %r", request.remote, exc)
    finally:
        state.streams.discard(sub)
    return response
