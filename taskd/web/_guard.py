"""``BrowserGuard``: what the standalone server accepts from browsers."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from aiohttp import web

from ._errors import error_response

log = logging.getLogger("taskd.web")
T = TypeVar("T")

# --- browsers: cross-site requests and DNS rebinding ---------------------------------------

_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_CORS_HEADERS: Final = "Authorization, Content-Type, Last-Event-ID"


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header value (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def is_loopback(name: str) -> bool:
    """Whether a host name or address is loopback (``localhost`` included)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class BrowserGuard:
    """What the standalone server accepts from browsers.

    ``check_host``: accept only ``Host`` values that are loopback names or addresses,
    or listed in ``allowed_hosts`` (the server's own ``--host`` among them): a defence
    against DNS rebinding, for servers that answer anyone who reaches them (no
    tokens). ``cors_origins``: foreign origins allowed to make unsafe requests (and
    given CORS headers); any other foreign ``Origin`` — or ``Sec-Fetch-Site:
    cross-site`` — on a POST, PUT, PATCH or DELETE gets 403 ``PERMISSION_DENIED``.
    Clients that send no ``Origin`` (curl, the CLI, SDKs) are not affected.
    """

    check_host: bool = True
    allowed_hosts: frozenset[str] = frozenset()
    cors_origins: frozenset[str] = frozenset()

    def host_allowed(self, host: str) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        name = _host_name(host)
        # No Host at all (HTTP/1.0) is no browser: DNS rebinding needs one.
        return not name or is_loopback(name) or name in self.allowed_hosts

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """The middleware that applies the guard (outermost)."""
        screen = self.screen()

        @web.middleware
        async def browser_guard(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            refused = screen.before(request)
            if refused is not None:
                return refused
            response = await handler(request)
            screen.after(request, response)
            return response

        return browser_guard

    def screen(self) -> Screen:
        """The guard's checks as two plain calls, for a middleware that applies it
        along with other work (the standalone app's one middleware)."""
        return Screen(self)

    @staticmethod
    def _cors(origin: str, *, preflight: bool) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
            headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            headers["Access-Control-Max-Age"] = "600"
        else:
            headers["Access-Control-Expose-Headers"] = "Location, Link, Retry-After"
        return headers


class Screen:
    """One guard's checks: ``before`` a request (a refusal, or None to go on) and
    ``after`` it (CORS headers on the answer to a listed origin)."""

    __slots__ = ("_guard", "check_host", "hosts")

    def __init__(self, guard: BrowserGuard) -> None:
        self._guard = guard
        #: Whether the ``Host`` header is checked (the guard's ``check_host``).
        self.check_host = guard.check_host
        #: Host header -> allowed, for the few values a server sees (bounded): parsing
        #: an address on every request would cost the hottest route ~5% of its rate.
        #: A route wrapper reads it to let the common request skip ``before``.
        self.hosts: dict[str, bool] = {}

    def _host_ok(self, host: str) -> bool:
        ok = self.hosts.get(host)
        if ok is None:
            ok = self._guard.host_allowed(host)
            if len(self.hosts) < 256:
                self.hosts[host] = ok
        return ok

    def before(self, request: web.Request) -> web.StreamResponse | None:
        """A refusal (403, or the answer to a CORS preflight), or None to go on."""
        guard = self._guard
        headers = request.headers
        if (
            guard.check_host
            and not self._host_ok(headers.get("Host", ""))
            and request.path != "/health"
        ):
            return error_response(
                403,
                "PERMISSION_DENIED",
                "this Host is not allowed (taskd serve --allow-host)",
            )
        origin = headers.get("Origin")
        listed = origin is not None and origin in guard.cors_origins
        if (
            request.method == "OPTIONS"
            and origin is not None
            and listed
            and "Access-Control-Request-Method" in headers
        ):
            return web.Response(status=204, headers=guard._cors(origin, preflight=True))
        if request.method not in _SAFE_METHODS and not listed:
            own = f"{request.scheme}://{request.host}"
            cross = headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
            if cross or (origin is not None and origin.lower() != own.lower()):
                return error_response(
                    403,
                    "PERMISSION_DENIED",
                    "cross-site request refused (taskd serve --cors-origin)",
                )
        return None

    def after(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers a listed origin's answer carries."""
        origin = request.headers.get("Origin")
        if origin is not None and origin in self._guard.cors_origins and not response.prepared:
            response.headers.update(self._guard._cors(origin, preflight=False))
