"""What a hostile probe broke (docs/reliability.md): token parsing, metrics exposure,
per-owner quotas, cross-site browsers and DNS rebinding, invalid Unicode, a failing or
vanishing SQLite file, slow clients, hung webhook receivers, terminal injection."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import taskd
import taskd.web

from .service import Service, cli, free_port, metric, wait_for
from .test_serve import http

API = "/api/v1"


def request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def code_of(raw: bytes) -> str:
    return str(json.loads(raw)["error"]["code"])


# --- auth ---------------------------------------------------------------------------------


def test_base64_token_ending_in_equals_is_a_bare_token(tmp_path: Path) -> None:
    with Service(tmp_path, "--token", "YWJjZA==", "--token", "bob=tok2") as s:
        assert http("GET", s.url + API + "/tasks", token="YWJjZA==")[0] == 200
        assert http("GET", s.url + API + "/tasks", token="=")[0] == 401
        assert http("GET", s.url + API + "/tasks", token="tok2")[0] == 200


def test_one_token_for_two_owners_is_refused_without_naming_it(tmp_path: Path) -> None:
    out = cli("serve", "--token", "alice=s3cr3t", "--token", "bob=s3cr3t", "--port", "1")
    assert out.returncode == 1
    assert "alice" in out.stderr and "bob" in out.stderr and "s3cr3t" not in out.stderr


def test_metrics_need_a_token_and_task_type_labels_are_capped(tmp_path: Path) -> None:
    with Service(tmp_path, "--token", "alice=tok1") as s:
        status, _, raw = request(s.url + "/metrics")
        assert status == 401 and code_of(raw) == "UNAUTHENTICATED"
        for i in range(130):
            http("POST", s.url + API + "/tasks", {"task_type": f"type{i:03d}"}, token="tok1")
        status, _, raw = request(s.url + "/metrics", headers={"Authorization": "Bearer tok1"})
    assert status == 200
    types = set(re.findall(rb'taskd_tasks\{[^}]*task_type="([^"]+)"', raw))
    assert len(types) == 101 and b"_other" in types


def test_per_owner_quota_answers_429(tmp_path: Path) -> None:
    with Service(
        tmp_path, "--token", "a=ta", "--token", "b=tb", "--max-active-per-owner", "2"
    ) as s:
        for _ in range(2):
            assert http("POST", s.url + API + "/tasks", {"task_type": "t"}, token="ta")[0] == 201
        status, headers, raw = request(
            s.url + API + "/tasks",
            "POST",
            b'{"task_type":"t"}',
            {"Authorization": "Bearer ta"},
        )
        assert status == 429 and code_of(raw) == "RESOURCE_EXHAUSTED"
        assert headers["Retry-After"] == "1"
        # another owner is not locked out
        assert http("POST", s.url + API + "/tasks", {"task_type": "t"}, token="tb")[0] == 201
        doc = http("GET", s.url + API + "/openapi.json", token="ta")[1]
    assert "429" in doc["paths"]["/api/v1/tasks"]["post"]["responses"]


async def test_quota_in_the_python_api() -> None:
    retention = taskd.Retention(max_active_per_owner=1)
    async with taskd.Tracker(retention=retention) as tracker:
        first = await tracker.create("t", owner="a")
        with pytest.raises(taskd.QuotaExceeded):
            await tracker.create("t", owner="a")
        await tracker.cancel(first.task_id)
        await tracker.create("t", owner="a")  # room again once the first ended
    with pytest.raises(ValueError):
        taskd.Retention(max_active_per_owner=0)


# --- browsers against the no-token default --------------------------------------------------


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[Service]:
    with Service(
        tmp_path,
        "--cors-origin",
        "https://other.example",
        "https://app.example",  # several values to one flag, as --token takes them
        "--allow-host",
        "tasks.lan",
    ) as s:
        yield s


def test_cross_site_simple_post_is_refused(open_server: Service) -> None:
    url = open_server.url + API + "/tasks"
    body = b'{"task_type":"t"}'
    status, _, raw = request(
        url, "POST", body, {"Content-Type": "text/plain", "Origin": "https://evil.example"}
    )
    assert status == 403 and code_of(raw) == "PERMISSION_DENIED"
    status, _, _ = request(url, "POST", body, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert http("GET", url)[1]["result"] == []  # nothing was created
    # curl and the CLI send no Origin; the page itself sends its own origin
    assert request(url, "POST", body)[0] == 201
    own = f"http://127.0.0.1:{open_server.port}"
    assert request(url, "POST", body, {"Origin": own})[0] == 201


def test_listed_cors_origin_is_allowed_with_preflight(open_server: Service) -> None:
    url = open_server.url + API + "/tasks"
    origin = {"Origin": "https://app.example"}
    status, headers, _ = request(
        url, "OPTIONS", None, {**origin, "Access-Control-Request-Method": "POST"}
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    status, headers, raw = request(url, "POST", b'{"task_type":"t"}', origin)
    assert status == 201 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    # The hottest route skips the guard for a plain GET; one with an Origin still
    # gets its CORS headers (after plain GETs from the same Host).
    task_url = f"{url}/{json.loads(raw)['result']['task_id']}"
    assert "Access-Control-Allow-Origin" not in request(task_url)[1]
    status, headers, _ = request(task_url, headers=origin)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_foreign_host_is_refused_without_tokens(open_server: Service) -> None:
    url = open_server.url + API + "/tasks"
    status, _, raw = request(url, headers={"Host": "attacker.example"})
    assert status == 403 and code_of(raw) == "PERMISSION_DENIED"
    for host in ("localhost:8080", "127.0.0.1", "[::1]:80", "tasks.lan"):
        assert request(url, headers={"Host": host})[0] == 200, host
    # a foreign Host stays refused on the task route, after allowed Hosts passed it
    task_url = f"{url}/{http('POST', url, {'task_type': 't'})[1]['result']['task_id']}"
    assert request(task_url)[0] == 200
    status, _, raw = request(task_url, headers={"Host": "attacker.example"})
    assert status == 403 and code_of(raw) == "PERMISSION_DENIED"
    # a load balancer's health check passes whatever its Host
    assert request(open_server.url + "/health", headers={"Host": "10.0.0.7"})[0] == 200


def test_dashboard_cannot_be_framed(open_server: Service) -> None:
    _, headers, _ = request(open_server.url + "/")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


# --- input --------------------------------------------------------------------------------


def test_lone_surrogates_are_400_and_the_store_keeps_working(tmp_path: Path) -> None:
    with Service(tmp_path, "--db", str(tmp_path / "t.db"), "--webhook-secret", "s",
                 "--webhook-allow", "127.0.0.1") as s:  # fmt: skip
        url = s.url + API
        tid = http("POST", url + "/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        http("POST", f"{url}/tasks/{tid}/start")
        lone = '"\\ud800"'
        for path, body in (
            ("/tasks", '{"task_type":"t","resource_id":%s}'),
            ("/tasks", '{"task_type":"t","callback_url":%s}'),
            ("/tasks", '{"task_type":"t","metadata":{"k":%s}}'),
            (f"/tasks/{tid}/progress", '{"message":%s}'),
            (f"/tasks/{tid}/fail", '{"error":%s}'),
            (f"/tasks/{tid}/complete", '{"result":{"k":[%s]}}'),
        ):
            status, _, raw = request(url + path, "POST", (body % lone).encode())
            assert status == 400 and code_of(raw) == "INVALID_ARGUMENT", (path, raw)
        # raw UTF-8 encoding of a surrogate is not valid UTF-8 either
        status, _, _ = request(
            url + "/tasks", "POST", b'{"task_type":"t","resource_id":"\xed\xa0\x80"}'
        )
        assert status == 400
        # every owner goes on being served
        assert http("POST", url + "/tasks", {"task_type": "t"})[0] == 201
        assert http("POST", f"{url}/tasks/{tid}/complete", {"result": "é😀"})[0] == 200
        assert request(s.url + "/health")[0] == 200


def test_callback_url_with_whitespace_is_400(tmp_path: Path) -> None:
    with Service(tmp_path, "--webhook-secret", "s", "--webhook-allow", "127.0.0.1") as s:
        for bad in ("http://127.0.0.1/a\tb", "http://127.0.0.1/a b", "http://127.0.0.1/a\r\nX: y"):
            status, body = http(
                "POST", s.url + API + "/tasks", {"task_type": "t", "callback_url": bad}
            )
            assert status == 400, bad
            assert body["error"]["code"] == "INVALID_ARGUMENT"


# --- the store ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs) that the test can fill and make read-only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_is_503_then_recovers_by_itself(small_disk: Path) -> None:
    db = small_disk / "t.db"
    with Service(small_disk.parent, "--db", str(db)) as s:
        url = s.url + API
        acked = [http("POST", url + "/tasks", {"task_type": "t"})[1]["result"]["task_id"]]
        filler = _fill(small_disk)
        refused = 0
        for i in range(200):  # until SQLite needs a page it cannot get
            status, _, raw = request(
                url + "/tasks",
                "POST",
                json.dumps({"task_type": "t", "metadata": {"pad": "x" * 8000, "i": i}}).encode(),
            )
            if status == 201:
                acked.append(json.loads(raw)["result"]["task_id"])
                continue
            assert status == 503 and code_of(raw) == "UNAVAILABLE"
            refused += 1
            break
        assert refused == 1
        status, headers, raw = request(url + "/tasks", "POST", b'{"task_type":"t"}')
        assert status == 503 and headers["Retry-After"] == "1"
        status, _, raw = request(s.url + "/health")
        assert status == 503 and b"full" in raw
        assert http("GET", f"{url}/tasks/{acked[0]}")[0] == 200  # reads go on
        filler.unlink()
        wait_for(lambda: request(s.url + "/health")[0] == 200, timeout=10)  # recovered
        acked.append(http("POST", url + "/tasks", {"task_type": "t"})[1]["result"]["task_id"])
    assert s.log().count(" ERROR ") == 1  # one line per episode
    with Service(small_disk.parent, "--db", str(db)) as again:
        for tid in acked:
            assert http("GET", f"{again.url}{API}/tasks/{tid}")[0] == 200


def test_read_only_db_is_refused_at_start(small_disk: Path) -> None:
    db = small_disk / "t.db"
    with Service(small_disk.parent, "--db", str(db)):
        pass
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = cli("serve", "--db", str(db), "--port", str(free_port()))
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_deleted_db_file_refuses_writes(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with Service(tmp_path, "--db", str(db)) as s:
        url = s.url + API
        assert http("POST", url + "/tasks", {"task_type": "t"})[0] == 201
        db.unlink()
        status, body = http("POST", url + "/tasks", {"task_type": "t"})
        assert status == 503 and body["error"]["code"] == "UNAVAILABLE"
        status, body = http("GET", s.url + "/health")
        assert status == 503 and "deleted or replaced" in body["error"]["message"]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_second_server_through_a_link_is_refused(tmp_path: Path, link: str) -> None:
    db = tmp_path / "t.db"
    with Service(tmp_path, "--db", str(db)):
        other = tmp_path / "other.db"
        if link == "symlink":
            other.symlink_to(db)
        else:
            os.link(db, other)
        out = cli("serve", "--db", str(other), "--port", str(free_port()))
    assert out.returncode == 1 and "in use" in out.stderr


# --- connections and shutdown -------------------------------------------------------------


def test_slow_and_idle_connections_are_closed(tmp_path: Path) -> None:
    with (
        Service(tmp_path, "--read-timeout", "1", "--keepalive-timeout", "1") as s,
        contextlib.ExitStack() as sockets,  # closed even when an assertion fails
    ):
        slow, idle, body = (
            sockets.enter_context(socket.create_connection(("127.0.0.1", s.port))) for _ in range(3)
        )
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never ends
        body.sendall(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
        )
        for sock in (slow, idle, body):
            sock.settimeout(10)  # closed by the server well before this
            assert sock.recv(1024) == b""
        # a long-poll is not a slow request: it outlives the read timeout
        tid = http("POST", s.url + API + "/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        started = time.monotonic()
        assert http("GET", f"{s.url}{API}/tasks/{tid}?wait=2")[0] == 200
        assert time.monotonic() - started >= 1.9


def test_hung_webhook_receiver_does_not_hold_up_exit(tmp_path: Path) -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts connections, never answers
    port = hung.getsockname()[1]
    with Service(tmp_path, "--webhook-secret", "s", "--webhook-allow", f"127.0.0.1:{port}") as s:
        tid = http(
            "POST",
            s.url + API + "/tasks",
            {"task_type": "t", "callback_url": f"http://127.0.0.1:{port}/hook?token=abc"},
        )[1]["result"]["task_id"]
        http("POST", f"{s.url}{API}/tasks/{tid}/cancel")
        hung.settimeout(10)
        conn, _ = hung.accept()  # the delivery has reached the receiver: now it hangs
        started = time.monotonic()
        code = s.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
    conn.close()
    hung.close()
    assert code == 0
    assert elapsed < 5.0 + 2.0
    assert "dropping 1 undelivered webhook" in s.log()
    assert "token=abc" not in s.log()


def test_vanished_event_stream_clients_are_not_errors(tmp_path: Path) -> None:
    with Service(tmp_path) as s:
        tid = http("POST", s.url + API + "/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        http("POST", f"{s.url}{API}/tasks/{tid}/start")
        socks = []
        for _ in range(3):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(("127.0.0.1", s.port))
            c.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(c)
        wait_for(lambda: metric(s.url, "taskd_subscriptions") == 3, timeout=10, interval=0.05)
        deadline = time.monotonic() + 30
        for i in range(1500):  # fill the buffers: the server blocks writing
            http("POST", f"{s.url}{API}/tasks/{tid}/progress", {"message": "x" * 1000 + str(i)})
        for c in socks:  # then the clients vanish (RST)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()
        while "taskd_subscriptions 0.0" not in request(s.url + "/metrics")[2].decode():
            assert time.monotonic() < deadline
            http("POST", f"{s.url}{API}/tasks/{tid}/progress", {"progress": 0.5})
    assert "ERROR" not in s.log() and "Traceback" not in s.log()


# --- the CLI and hostile task text ----------------------------------------------------------


def test_cli_prints_task_text_literally(tmp_path: Path) -> None:
    hostile = "[/x] [link=https://evil.example]click[/link] \x1b[2J\x1b]52;c;aGk=\x07 \x9b31m"
    with Service(tmp_path) as s:
        tid = http("POST", s.url + API + "/tasks", {"task_type": "t"})[1]["result"]["task_id"]
        http("POST", f"{s.url}{API}/tasks/{tid}/start")
        http("POST", f"{s.url}{API}/tasks/{tid}/progress", {"message": hostile})
        http("POST", f"{s.url}{API}/tasks/{tid}/fail", {"error": hostile})
        outs = [
            cli("get", tid, "--url", s.url),
            cli("list", "--url", s.url),
            cli("wait", tid, "--url", s.url),
        ]
    for out in outs:
        assert "Traceback" not in out.stderr, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\x9b" not in out.stdout
        assert "\\x1b" in out.stdout
    assert "[/x]" in outs[0].stdout and "[link=https://evil.example]" in outs[0].stdout
    assert outs[2].returncode == 1


# --- control characters: one answer on every engine -----------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
def every_engine(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """``create_app`` options for each engine: memory, a SQLite file, a real Redis."""
    if request.param == "memory":
        return {}
    if request.param == "sqlite":
        return {"store": taskd.SQLiteStore(tmp_path / "t.db")}
    server = request.getfixturevalue("redis_server")
    return {"redis": server.url, "redis_prefix": f"ctl-{os.urandom(6).hex()}:"}


async def test_nul_and_control_characters_get_one_answer_on_every_engine(
    aiohttp_client: Any, every_engine: dict[str, object]
) -> None:
    """docs/http-api.md: a progress message with NUL is 400 (ValueError in Python) on
    every engine, never acknowledged and then dropped; C0 and C1 controls (``\\x9b``)
    in a resource id are refused; other controls in a message are kept as sent."""
    app = taskd.web.create_app(close_timeout=0.2, **every_engine)  # type: ignore[arg-type]
    client = await aiohttp_client(app)
    tracker = taskd.web.get_tracker(app)
    resp = await client.post(API + "/tasks", json={"task_type": "t"})
    assert resp.status == 201
    tid = (await resp.json())["result"]["task_id"]
    assert (await client.post(f"{API}/tasks/{tid}/start")).status == 200
    for bad in ("\x00", "a\x00b"):
        resp = await client.post(f"{API}/tasks/{tid}/progress", json={"message": bad})
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"
        with pytest.raises(ValueError, match="NUL"):
            await tracker.progress(tid, 0.5, message=bad)
    for bad in ("a\x9bb", "a\x85", "\x1b[31m", "a\x00", "\x7f"):
        resp = await client.post(API + "/tasks", json={"task_type": "t", "resource_id": bad})
        assert resp.status == 400, (bad, await resp.text())
        resp = await client.get(API + "/tasks", params={"resource_id": bad})
        assert resp.status == 400, (bad, await resp.text())
        with pytest.raises(ValueError, match="control characters"):
            await tracker.create("t", resource_id=bad)
    # A task id is taskd's own: one with control characters names no task.
    for path in ("/tasks/a%00b", "/tasks/a%C2%9Bb", "/tasks/a%0Ab/start"):
        resp = await (client.post if path.endswith("start") else client.get)(API + path)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"
    # Any other control character in a message is stored and read back as sent.
    kept = "line 1\nline 2\t\x1b[31mred\x9b\x07"
    resp = await client.post(f"{API}/tasks/{tid}/progress", json={"message": kept})
    assert resp.status == 200
    resp = await client.get(API + "/tasks", params={"status": "running"})
    [listed] = (await resp.json())["result"]
    assert listed["message"] == kept
    rec = await tracker.get(tid)
    assert rec is not None and rec.message == kept
    # An error is JSON-escaped like a result: every character comes back.
    error = "boom\x00 at\n\x9bline 2"
    resp = await client.post(f"{API}/tasks/{tid}/fail", json={"error": error})
    assert resp.status == 200 and (await resp.json())["result"]["error"] == error
    resp = await client.get(API + "/tasks", params={"status": "failed"})
    assert [r["error"] for r in (await resp.json())["result"]] == [error]


# --- what aiohttp answers before any middleware ---------------------------------------


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; read one response (these close it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")):
            chunk = sock.recv(65536)
            assert chunk, body
            body += chunk
        return int(lines[0].split()[1]), headers, body


def test_parser_level_errors_and_unknown_methods_are_enveloped(tmp_path: Path) -> None:
    """docs/http-api.md: on `taskd serve`, what aiohttp's parser refuses gets the JSON
    envelope (400 INVALID_ARGUMENT), and a method it does not know is 405 with Allow."""
    host = b"Host: 127.0.0.1\r\n"
    bad = {
        "two Content-Lengths": b"POST /api/v1/tasks HTTP/1.1\r\n" + host
        + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "CL and TE": b"POST /api/v1/tasks HTTP/1.1\r\n" + host
        + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "60 KB URL": b"GET /api/v1/tasks?x=" + b"a" * 60_000 + b" HTTP/1.1\r\n" + host + b"\r\n",
        "20 KB header": b"GET /health HTTP/1.1\r\n" + host + b"X-A: " + b"a" * 20_000
        + b"\r\n\r\n",
        "bad header": b"GET /health HTTP/1.1\r\n" + host + b"X A: b\r\n\r\n",
        "bad chunk": b"POST /api/v1/tasks HTTP/1.1\r\n" + host
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        "bad version": b"GET /health HTTP/9.x\r\n\r\n",
        "TLS": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,
    }  # fmt: skip
    with Service(tmp_path) as s:
        for what, data in bad.items():
            status, headers, body = raw_exchange(s.port, data)
            assert status == 400, (what, body)
            assert headers["content-type"].startswith("application/json"), what
            error = json.loads(body)["error"]
            assert error["code"] == "INVALID_ARGUMENT", (what, error)
            assert error["message"].startswith("malformed HTTP request: "), error
            assert "\n" not in error["message"] and body.endswith(b"}\n"), what
        unknown = {
            b"/api/v1/tasks": "DELETE, GET, POST",
            b"/api/v1/tasks/0123?x=1": "DELETE, GET",
            b"/api/v1/tasks/0123/start": "POST",
            b"/health": "GET",
        }
        for method in (b"FOO", b"PROPFIND"):  # unknown to llhttp, and known to it
            for path, allow in unknown.items():
                status, headers, body = raw_exchange(
                    s.port, method + b" " + path + b" HTTP/1.1\r\n" + host + b"\r\n"
                )
                assert (status, headers.get("allow")) == (405, allow), (method, path, body)
                assert json.loads(body)["error"]["code"] == "METHOD_NOT_ALLOWED"
        status, _, body = raw_exchange(s.port, b"FOO /nowhere HTTP/1.1\r\n" + host + b"\r\n")
        assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
        # The server goes on serving, and logged no traceback for any of this.
        assert request(s.url + "/health")[0] == 200
        assert "Traceback" not in s.log()
