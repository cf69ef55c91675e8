"""Signed webhooks on terminal transitions (Standard Webhooks convention).

The actor hands each terminal record that has a ``callback_url`` to ``WebhookSender``
after the commit and goes on: delivery happens in tasks of the sender's own, and the
blocking HTTP call runs on a small thread pool (the core uses the standard library's
``urllib`` so that it never imports aiohttp). A receiver that hangs holds one thread
until the request timeout; the others keep delivering.

Signature: ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.
A secret of the form ``whsec_<base64>`` is used as the base64-decoded key, as the
Standard Webhooks libraries do (padded or not). Only the standard alphabet: those
libraries drop ``-`` and ``_``, so a URL-safe secret would decode to another key on
the receiver's side and no delivery would verify; it is refused, as is a secret that
is not base64, when ``Webhooks`` is built. Any other secret is used as its UTF-8
bytes, which receivers must then use as their key.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from ._args import check_unicode
from ._checks import check_seconds
from ._models import TaskRecord

__all__ = ["Webhooks", "sign"]

log = logging.getLogger("taskd.webhooks")

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# The body of a whsec_ secret (padding removed): standard base64, or base64 with at
# least one URL-safe character and nothing outside either alphabet.
_STANDARD: Final = re.compile(r"[A-Za-z0-9+/]+")
_URLSAFE: Final = re.compile(r"(?=.*[-_])[A-Za-z0-9+/_-]+")
# Where a secret comes from, for the one-line error taskd serve prints.
_WHERE: Final = " (Webhooks.secret; taskd serve --webhook-secret / TASKD_WEBHOOK_SECRET)"


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return decode_whsec(secret)
    return secret.encode()


def decode_whsec(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret: standard base64, with or without
    padding (surrounding whitespace ignored). ``ValueError`` (one line, naming the
    option) when it is not base64, decodes to nothing, or uses the URL-safe alphabet."""
    body = secret.removeprefix("whsec_").strip().rstrip("=")
    if body and _URLSAFE.fullmatch(body):
        # The Standard Webhooks libraries decode standard base64 and silently drop
        # "-" and "_": the receiver would verify with another key than ours.
        raise ValueError(
            "webhook secret uses URL-safe base64 ('-' or '_'), which Standard Webhooks "
            "receivers decode to another key: give it in standard base64 ('+' and '/')" + _WHERE
        )
    if not body or not _STANDARD.fullmatch(body) or len(body) % 4 == 1:
        raise ValueError(
            "webhook secret starts with 'whsec_' but the rest is not base64: give the "
            "base64 key (as Standard Webhooks libraries do) or drop the prefix" + _WHERE
        )
    return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _parse_allow(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = entry.strip().lower()
    bad = ValueError(
        f"bad webhook allow-list entry {entry!r}: use HOST, HOST:PORT, an IPv6 address "
        "or [IPv6]:PORT"
    )
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        port_text = rest[1:] if rest else None
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise bad from None
    elif text.count(":") > 1:  # a bare IPv6 address: no port
        try:
            host = str(ipaddress.IPv6Address(text))
        except ValueError:
            raise bad from None
    else:
        host, sep, rest = text.partition(":")
        port_text = rest if sep else None
    if not host or any(c in host for c in "/@?#[] \t"):
        raise bad
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad
    return host, int(port_text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhooks:
    """Webhook settings: the signing secret and the allow-list of targets.

    ``allow`` holds ``host`` or ``host:port`` entries; it is empty by default, so no
    ``callback_url`` is accepted until it names the receivers. Delivery is retried on
    a network error or a non-2xx answer, ``max_attempts`` times in all, with
    exponential backoff and jitter from ``first_retry`` seconds; redirects are never
    followed.
    """

    secret: str
    allow: tuple[str, ...] = ()
    max_attempts: int = 6
    first_retry: float = 1.0
    timeout: float = 10.0
    max_in_flight: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or not self.secret:
            raise ValueError("Webhooks.secret must be a non-empty string")
        if self.secret.startswith("whsec_"):
            decode_whsec(self.secret)
        if isinstance(self.allow, str) or not all(isinstance(a, str) for a in self.allow):
            raise TypeError("Webhooks.allow must be a sequence of 'host[:port]' strings")
        object.__setattr__(self, "allow", tuple(self.allow))
        for entry in self.allow:
            _parse_allow(entry)
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError("Webhooks.max_attempts must be an int >= 1")
        for name in ("first_retry", "timeout"):
            if check_seconds(getattr(self, name), f"Webhooks.{name}") is None:
                raise ValueError(f"Webhooks.{name} must be a positive number of seconds")
        if self.first_retry > 5:
            raise ValueError("Webhooks.first_retry must be at most 5 seconds")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError("Webhooks.max_in_flight must be an int >= 1")

    def check_url(self, url: str) -> str:
        """Return ``url`` if it is http(s) and its host[:port] is on the allow-list."""
        if any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
            # urllib would refuse it at delivery time, after the task was accepted.
            raise ValueError("callback_url must not contain spaces or control characters")
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError("callback_url must be an http(s) URL with a host")
        if parts.username or parts.password:
            raise ValueError("callback_url must not carry credentials")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError("callback_url has an invalid port") from None
        host = parts.hostname.lower()
        with contextlib.suppress(ValueError):
            host = str(ipaddress.IPv6Address(host))
        for entry in self.allow:
            allowed_host, allowed_port = _parse_allow(entry)
            if host == allowed_host and allowed_port in (None, port):
                return url
        raise ValueError(
            f"callback_url host {host}:{port} is not on the webhook allow-list"
            " (taskd serve --webhook-allow HOST[:PORT])"
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could point anywhere: the allow-list was checked for the first URL only.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response and its socket: close them now, not at GC
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return 0


def _loggable(url: str) -> str:
    """A callback URL for a log line: its query string may carry a token."""
    base, sep, _ = url.partition("?")
    return f"{base}?[REDACTED]" if sep else base


class _DaemonPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads. ``ThreadPoolExecutor`` threads are joined at
    interpreter exit, so one delivery hung on a receiver would hold the process up
    to its request timeout; a daemon thread does not, and an undelivered webhook is
    dropped at shutdown anyway (it is logged, and documented as dropped)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Any, tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        if self._closed:
            raise RuntimeError("the webhook pool is closed")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        if len(self._threads) < self._size:
            thread = threading.Thread(target=self._work, name="taskd-webhook", daemon=True)
            thread.start()
            self._threads.append(thread)
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting task
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


class WebhookSender:
    """Delivers webhooks off the actor: one task per message, daemon threads for I/O."""

    def __init__(self, config: Webhooks) -> None:
        self.config = config
        self._pool = _DaemonPool(config.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.delivered = 0
        self.failed = 0

    def submit(self, rec: TaskRecord, done: Callable[[], object] | None = None) -> None:
        """Start delivering one terminal record (called by the actor; never blocks).
        ``done`` is called once delivery ended, delivered or given up (not if shutdown
        cut it short: a shared outbox then hands the entry to another process)."""
        if self._closed or rec.callback_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(rec.callback_url, rec, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, url: str, rec: TaskRecord, done: Callable[[], object] | None = None
    ) -> None:
        await self._attempts(url, rec)
        if done is not None:
            done()

    async def _attempts(self, url: str, rec: TaskRecord) -> None:
        cfg = self.config
        body = rec.to_json().encode()
        msg_id = f"msg_{rec.task_id}_{rec.status.value}"
        loop = asyncio.get_running_loop()
        for attempt in range(cfg.max_attempts):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "taskd-webhooks",
                "webhook-id": msg_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(cfg.secret, msg_id, timestamp, body),
            }
            if rec.traceparent is not None:
                # the receiver's work continues the task's trace (docs/tracing.md)
                headers["traceparent"] = rec.traceparent
            status = await loop.run_in_executor(self._pool, _post, url, body, headers, cfg.timeout)
            if 200 <= status < 300:
                self.delivered += 1
                return
            if attempt + 1 < cfg.max_attempts:
                # Exponential backoff with jitter, so that retries of many failed
                # deliveries do not arrive at the receiver in lockstep.
                delay = cfg.first_retry * (2**attempt) * random.uniform(0.5, 1.0)
                log.info(
                    "webhook %s to %s answered %s; retry %d in %.1fs",
                    msg_id,
                    _loggable(url),
                    status or "no response",
                    attempt + 1,
                    delay,
                    extra={"task_id": rec.task_id},
                )
                await asyncio.sleep(delay)
        self.failed += 1
        log.warning(
            "webhook %s to %s failed after %d attempts",
            msg_id,
            _loggable(url),
            cfg.max_attempts,
            extra={"task_id": rec.task_id},
        )

    async def aclose(self) -> None:
        """Cancel pending deliveries and retries, and wait for them to unwind; the
        undelivered are dropped (logged with a count)."""
        self._closed = True
        tasks = list(self._tasks)
        if tasks:
            log.warning("shutting down: dropping %d undelivered webhook(s)", len(tasks))
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Threads still blocked on a hung receiver are daemons: they hold up nothing.
        self._pool.shutdown(wait=False, cancel_futures=True)


def parse_allow_list(values: Iterable[str]) -> tuple[str, ...]:
    """Split comma-separated allow-list values and check each entry."""
    out = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    for entry in out:
        _parse_allow(entry)
    return out


def check_callback(webhooks: Webhooks | None, url: object) -> str | None:
    """A task's ``callback_url``: None, or a URL the webhooks' allow-list admits."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise TypeError("callback_url must be a str or None")
    if len(url) > 2048:
        raise ValueError("callback_url must be at most 2048 characters")
    check_unicode(url, "callback_url")
    if webhooks is None:
        raise ValueError(
            "callback_url is not allowed: no webhooks are configured (the allow-list is empty)"
        )
    return webhooks.check_url(url)
