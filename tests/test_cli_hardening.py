"""`taskd serve` and the CLI under faults and first-time use (docs/cli.md,
docs/operations.md): a supervisor that dies takes its workers with it, a port in use
fails fast, half-open connections cannot starve `/health`, tables keep statuses
readable, and every mistake a user makes is one line in taskd's words."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clients import MakeClient
from .redis_server import RedisServer
from .service import Service, cli, free_port, wait_for
from .test_serve import create, http

ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1"


def prefix() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}:"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- items 4 and 16: the supervisor and its workers ----------------------------------


def test_killing_the_supervisor_ends_its_workers(tmp_path: Path, redis_server: RedisServer) -> None:
    """docs/cli.md (--workers): SIGKILL the supervisor, every worker ends within 5 s
    (even worker 0, busy with demo jobs) and the port is free again. Before that:
    each worker's lines say which worker it is, and only worker 0 runs the demo."""
    s = Service(
        tmp_path,
        "--redis",
        redis_server.url,
        "--redis-prefix",
        prefix(),
        "--workers",
        "2",
        "--demo",
    )
    with s:
        assert s.proc is not None
        pid = s.proc.pid
        wait_for(lambda: s.log().count("serving on") == 2, timeout=15)
        workers = children(pid)
        assert len(workers) == 2
        assert s.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in workers), timeout=5, interval=0.05)
        assert time.monotonic() - killed < 5
        wait_for(lambda: port_free(s.port), timeout=2, interval=0.05)
    log = s.log()
    assert "taskd worker 0: the supervisor is gone" in log
    starts = [line for line in log.splitlines() if "serving on" in line]
    zero = [line for line in starts if "taskd worker 0:" in line]
    one = [line for line in starts if "taskd worker 1:" in line]
    assert len(zero) == 1 and len(one) == 1, starts
    assert "demo jobs" in zero[0] and "demo jobs" not in one[0]


def test_workers_on_a_port_in_use_fail_fast_with_one_line(redis_server: RedisServer) -> None:
    """docs/cli.md: a port in use is one line naming it, exit 1, before any worker
    starts (not one line per worker and an ERROR seconds later)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        out = cli("serve", "--redis", redis_server.url, "--workers", "4", "--port", str(port))
        took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], out.stderr
    assert "ERROR" not in out.stderr
    assert took < 2.0, took


# --- item 8: half-open connections cannot starve /health ------------------------------


def test_half_open_requests_beyond_the_fd_limit_leave_health_answering(
    tmp_path: Path,
) -> None:
    """docs/operations.md (connections): 1,100 half-open requests under a limit of
    1,024 open files; a new request to /health is answered at once (the oldest
    half-open connections make way), not after the 30 s read timeout."""
    s = Service(tmp_path)
    s.argv = ["prlimit", "--nofile=1024:1024", "--", *s.argv]
    half_open: list[socket.socket] = []
    with s:
        try:
            for _ in range(1100):
                conn = socket.create_connection(("127.0.0.1", s.port), timeout=5)
                half_open.append(conn)  # before it is used: closed whatever happens next
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
            started = time.monotonic()
            with urllib.request.urlopen(s.url + "/health", timeout=5) as resp:
                assert resp.status == 200
            assert time.monotonic() - started < 2.0
        finally:
            for conn in half_open:
                conn.close()
    assert "--max-connections" in s.log()  # the cap said it was reached, once a second


def test_max_connections_above_the_fd_limit_is_lowered_with_a_warning() -> None:
    from taskd.web._server import connection_cap

    assert connection_cap(1024) == 1024 - 128 - 64 - 64
    assert connection_cap(1024, 100) == 100
    assert connection_cap(1024, 10_000) == connection_cap(1024)


# --- item 12: the table keeps statuses whole -------------------------------------------


@pytest.mark.parametrize("columns", [100, 120, 140])
def test_list_keeps_status_whole_and_gives_up_the_message_first(
    service: Service, columns: int
) -> None:
    """docs/cli.md: on a narrower terminal the right-hand columns give way first; ids
    and statuses are never cut."""
    ids = {}
    for status in ("pending", "running", "cancelling", "completed", "failed", "cancelled"):
        tid = create(service.url, task_type="session_commit", resource_id=f"r-{status}")["task_id"]
        ids[status] = tid
        if status not in ("pending", "cancelled"):
            http("POST", f"{service.url}{API}/tasks/{tid}/start")
            http(
                "POST",
                f"{service.url}{API}/tasks/{tid}/progress",
                {"progress": 0.4, "message": "stage message " * 8},
            )
        if status in ("cancelling", "cancelled"):  # running: cancelling; pending: cancelled
            http("POST", f"{service.url}{API}/tasks/{tid}/cancel")
        if status == "completed":
            http("POST", f"{service.url}{API}/tasks/{tid}/complete")
        if status == "failed":
            http("POST", f"{service.url}{API}/tasks/{tid}/fail", {"error": "boom " * 20})
    out = cli("list", "--url", service.url, env={"COLUMNS": str(columns)})
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert all(len(row) <= columns for row in rows)
    for status, tid in ids.items():
        (row,) = [r for r in rows if tid in r]
        assert re.search(rf"│ {status}\s+│", row), row


def test_watch_table_keeps_status_whole(service: Service) -> None:
    """The same table in `taskd watch` (docs/cli.md)."""
    tid = create(service.url, task_type="session_commit")["task_id"]
    http("POST", f"{service.url}{API}/tasks/{tid}/start")
    http("POST", f"{service.url}{API}/tasks/{tid}/progress", {"message": "m " * 60})
    http("POST", f"{service.url}{API}/tasks/{tid}/cancel")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskd", "watch", "--url", service.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    try:

        def subscribed() -> bool:
            with urllib.request.urlopen(service.url + "/metrics") as resp:
                return "taskd_subscriptions 1.0" in resp.read().decode()

        wait_for(subscribed, timeout=20)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    (row,) = [r for r in stdout.splitlines() if tid in r][-1:]
    assert re.search(r"│ cancelling\s+│", row), stdout


# --- item 14: URLs as users give them; the README block pasted whole ------------------


def test_url_with_api_prefix_is_accepted(service: Service) -> None:
    """docs/cli.md: --url takes the server's URL with or without /api/v1."""
    tid = create(service.url, resource_id="r1")["task_id"]
    out = cli("get", tid, "--url", service.url + API, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["task_id"] == tid
    out = cli("list", "--url", service.url + API + "/", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["tasks"][0]["task_id"] == tid


def test_url_of_something_else_says_to_check_the_flag(service: Service) -> None:
    """A URL where no taskd API answers is one line naming --url, not "Not Found"."""
    out = cli("get", "x", "--url", service.url + "/elsewhere")
    assert out.returncode == 3
    (line,) = out.stderr.strip().splitlines()
    assert "HTTP 404" in line and "check --url / TASKD_URL" in line, line


async def test_client_accepts_the_api_url(service: Service, make_client: MakeClient) -> None:
    async with make_client(service.url + API) as client:
        assert client.base_url == service.url
        assert await client.health()
        rec = await client.create("job")
        assert (await client.get(rec.task_id)).task_id == rec.task_id


def test_url_without_scheme_is_one_line_naming_the_flag() -> None:
    out = cli("get", "x", "--url", "localhost:8080")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "taskd: --url must be an http:// or https:// URL, not 'localhost:8080' "
        "(did you mean http://localhost:8080?)"
    ]


def test_bad_taskd_url_exits_1_naming_it() -> None:
    """docs/cli.md: a bad environment value is exit 1, one line naming it."""
    out = cli("list", env={"TASKD_URL": "notaurl"})
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert "TASKD_URL" in line and "'notaurl'" in line


def test_readme_walkthrough_runs_pasted_as_one_block(tmp_path: Path) -> None:
    """README.md's curl walkthrough, run as one script (as a paste runs it): no
    request before the server listens, and the task ends completed."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A walkthrough with curl") :]
    block = section[section.index("```sh\n") + 6 : section.index("```\n", section.index("```sh"))]
    port = free_port()
    script = tmp_path / "walkthrough.sh"
    script.write_text("set -m\n" + block.replace("8090", str(port)))
    bindir = str(Path(sys.executable).parent)
    out = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert 'result: {"docs": 120}' in out.stdout, out.stdout
    assert out.stdout.count('"status":"completed"') >= 2, out.stdout  # long-poll and list
    wait_for(lambda: port_free(port), timeout=10)


# --- items 11 and 17: errors in taskd's words -----------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:abc/0", "its port is not a number"),
        ("redis://:secret@[::1/0", "IPv6"),
        ("redis://127.0.0.1:99999/0", "its port is not a number"),
        ("redis://127.0.0.1:6379/x", "the database after the port must be a number"),
        ("http://x", "must be a redis://"),
    ],
)
def test_malformed_redis_url_is_one_line_naming_the_flag(url: str, says: str) -> None:
    out = cli("serve", "--redis", url, "--port", str(free_port()))
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("taskd: --redis (env TASKD_REDIS)") and says in line, line
    assert "secret" not in line


class _PasswordRedis(RedisServer):
    """A redis-server with a password: its ping is answered NOAUTH."""

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


def test_redis_password_problems_are_one_line_in_taskds_words(tmp_path: Path) -> None:
    """docs/cli.md (--redis): a missing or wrong password names --redis and says what
    is wrong, not Redis's "HELLO must be called with the client already
    authenticated"; the password is never shown."""
    server = _PasswordRedis(tmp_path / "redis", "--requirepass", "sekret").start()
    try:
        base = f"127.0.0.1:{server.port}/0"
        cases = [
            (f"redis://{base}", "requires a password"),
            (f"redis://:wrong@{base}", "refused the user name or password"),
            (f"redis://bob:wrong@{base}", "refused the user name or password"),
        ]
        for url, says in cases:
            out = cli("serve", "--redis", url, "--port", str(free_port()))
            assert out.returncode == 1, out.stderr
            (line,) = out.stderr.strip().splitlines()
            assert says in line and "--redis" in line and "wrong@" not in line, line
            assert "HELLO" not in line and "AUTH" not in line, line
    finally:
        server.stop()


def test_unreachable_redis_names_the_flag() -> None:
    out = cli("serve", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--port", str(free_port()))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert "cannot be reached: connection refused" in line and "--redis" in line, line


def test_unknown_serve_flag_shows_serve_usage() -> None:
    """docs/cli.md: an unknown option gets the usage of the command it was given to."""
    out = cli("serve", "--prot", "8081")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: taskd serve ")
    assert "taskd serve: error: unrecognized arguments: --prot" in out.stderr
    assert "did you mean --port?" in out.stderr


def test_list_json_carries_the_next_page_token(service: Service) -> None:
    """docs/cli.md: `list --json` is one document with the tasks and the token."""
    for _ in range(3):
        create(service.url)
    first = json.loads(cli("list", "--url", service.url, "--limit", "2", "--json").stdout)
    assert len(first["tasks"]) == 2 and isinstance(first["next_page_token"], str)
    out = cli(
        "list", "--url", service.url, "--limit", "2", "--json", "--page-token",
        first["next_page_token"],
    )  # fmt: skip
    second = json.loads(out.stdout)
    assert len(second["tasks"]) == 1 and second["next_page_token"] is None
    assert out.stderr == ""


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with Service(tmp_path) as s:
        yield s
