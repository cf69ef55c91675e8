"""Raw-HTTP fuzz against a real server: truncated requests, huge headers, invalid
UTF-8, wrong content types, random bytes. Never a 5xx, never a hang."""

from __future__ import annotations

import random
import re
import socket
import time
import urllib.request

import pytest

from ..service import Service

API = "/api/v1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Service:  # type: ignore[misc]
    with Service(tmp_path_factory.mktemp("fuzz")) as s:
        yield s


def exchange(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes, half-close, read whatever comes back until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the server closed on us mid-send: a refusal, not a failure
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", raw)]


def healthy(server: Service) -> None:
    started = time.monotonic()
    with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
        assert resp.status == 200
    assert time.monotonic() - started < 2


def req(method: str, path: bytes, body: bytes = b"", headers: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method.encode()
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: x\r\n"
        + length
        + headers
        + b"\r\n"
        + body
    )


CASES: list[tuple[str, bytes]] = [
    ("truncated request line", b"GET /api/v1/tas"),
    ("no header end", b"GET /api/v1/tasks HTTP/1.1\r\nHost: x\r\n"),
    (
        "huge header",
        b"GET /api/v1/tasks HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    ),
    (
        "many headers",
        b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(2000)) + b"\r\n",
    ),
    ("long url", req("GET", b"/api/v1/tasks/" + b"a" * 60_000)),
    ("invalid utf-8 path", req("GET", b"/api/v1/tasks/\xff\xfe\xfd")),
    ("invalid utf-8 query", req("GET", b"/api/v1/tasks?status=\xff&task_type=\xc3\x28")),
    ("percent-encoded junk", req("GET", b"/api/v1/tasks/%ff%fe%00?wait=%ff")),
    (
        "invalid utf-8 body",
        req(
            "POST",
            API.encode() + b"/tasks",
            b'{"task_type": "\xff\xfe"}',
            b"Content-Type: application/json\r\n",
        ),
    ),
    (
        "text/plain body",
        req(
            "POST", API.encode() + b"/tasks", b'{"task_type": "x"}', b"Content-Type: text/plain\r\n"
        ),
    ),
    (
        "xml body",
        req("POST", API.encode() + b"/tasks", b"<task/>", b"Content-Type: application/xml\r\n"),
    ),
    (
        "form body",
        req(
            "POST",
            API.encode() + b"/tasks",
            b"task_type=x",
            b"Content-Type: application/x-www-form-urlencoded\r\n",
        ),
    ),
    (
        "nested json bomb",
        req(
            "POST",
            API.encode() + b"/tasks",
            b"[" * 50_000 + b"]" * 50_000,
            b"Content-Type: application/json\r\n",
        ),
    ),
    (
        "body shorter than length",
        b'POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"task_type":',
    ),
    ("bad content-length", b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    (
        "bad chunked",
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    ),
    (
        "both length and chunked",
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("null bytes", b"GET /api/v1/tasks\x00 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unknown method", req("BREW", API.encode() + b"/tasks")),
    ("http/0.9", b"GET /health\r\n"),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("tls hello", bytes.fromhex("16030100a5010000a10303") + bytes(160)),
    (
        "bad auth header",
        req("GET", API.encode() + b"/tasks", headers=b"Authorization: Bearer \xff\xfe\r\n"),
    ),
    (
        "bad last-event-id",
        req(
            "GET",
            API.encode() + b"/tasks/x/events",
            headers=b"Last-Event-ID: 99999999999999999999999\r\n",
        ),
    ),
    ("huge page token", req("GET", API.encode() + b"/tasks?page_token=" + b"A" * 20_000)),
    ("wait overflow", req("GET", API.encode() + b"/tasks/x?wait=1e309")),
    ("limit overflow", req("GET", API.encode() + b"/tasks?limit=99999999999999999999999")),
]


@pytest.mark.parametrize(("name", "payload"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server: Service, name: str, payload: bytes) -> None:
    raw = exchange(server.port, payload)
    assert all(code < 500 for code in statuses(raw)), raw[:300]
    assert b"Traceback" not in raw
    healthy(server)


def test_random_bytes(server: Service) -> None:
    rng = random.Random(20261127)
    prefixes = [b"", b"GET ", b"POST /api/v1/tasks HTTP/1.1\r\n", b"GET /api/v1/tasks?"]
    for _ in range(150):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
        raw = exchange(server.port, rng.choice(prefixes) + junk, timeout=1.0)
        assert all(code < 500 for code in statuses(raw)), raw[:300]
    healthy(server)
    assert "Traceback" not in server.log()
