"""``taskd serve``: build the standalone app from the command line and run it until
SIGINT or SIGTERM (docs/cli.md). Imported only by that subcommand."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from . import __version__
from ._errors import TaskdError
from ._redis import check_prefix, check_redis_url
from .cli import EXIT_OK, EXIT_START, CliError, _env, _tokens

#: Set in each worker process of ``--workers N`` to its index (0 runs the demo).
_WORKER_ENV = "TASKD_WORKER_INDEX"
#: Set in each worker to the file descriptor of the read end of the supervisor's pipe:
#: end of file on it means the supervisor is gone.
_PIPE_ENV = "TASKD_SUPERVISOR_FD"
#: How long a worker whose supervisor died may take to stop before it exits anyway
#: (docs/cli.md: "workers end within 5 s of their supervisor").
_ORPHAN_DEADLINE = 4.0
#: How long the supervisor waits for its workers to stop before it kills them.
_STOP_DEADLINE = 15.0

__all__ = ["serve"]

log = logging.getLogger("taskd")


def serve(args: argparse.Namespace) -> int:
    """Run ``taskd serve`` with parsed arguments; returns the exit status."""
    from aiohttp import web

    from ._retention import Retention
    from ._sqlite import SQLiteStore
    from ._webhooks import Webhooks, parse_allow_list
    from .web import BrowserGuard, bearer_auth, create_app
    from .web._guard import is_loopback
    from .web._server import (
        BACKLOG,
        ServeRunner,
        connection_cap,
        quiet_accept_errors,
        raise_fd_limit,
    )

    worker = os.environ.get(_WORKER_ENV)
    _configure_logging(args, worker)
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    quiet_accept_errors()
    max_connections = connection_cap(raise_fd_limit(), args.max_connections)
    tokens = _tokens(args.token)
    if not tokens and not is_loopback(args.host):
        log.warning(
            "serving on %s without tokens: anyone who can reach it sees every task", args.host
        )
    loop_factory = _loop_factory(args.loop)
    webhooks = None
    try:
        allow = parse_allow_list(args.webhook_allow)
        if args.webhook_secret:
            webhooks = Webhooks(secret=args.webhook_secret, allow=allow)
        elif allow:
            raise ValueError("--webhook-allow needs --webhook-secret (or TASKD_WEBHOOK_SECRET)")
    except ValueError as exc:
        raise CliError(str(exc), EXIT_START) from None
    if webhooks is not None and not webhooks.secret.startswith("whsec_"):
        log.warning(
            "the webhook secret is not of the form whsec_<base64>: receivers must use its "
            "raw UTF-8 bytes as the key (Standard Webhooks libraries expect whsec_<base64>)"
        )
    store = None
    if args.db and args.redis:
        raise CliError(
            "--db and --redis are exclusive: with --redis, Redis holds the tasks", EXIT_START
        )
    if args.redis:
        _check_redis_url(args.redis)
        try:
            check_prefix(args.redis_prefix)
        except ValueError as exc:
            raise CliError(f"--redis-prefix: {exc}", EXIT_START) from None
        if worker is None:
            # Once, before any worker starts: a Redis that cannot be used is one line
            # in taskd's words (not N workers' lines in Redis's words).
            _check_redis(args.redis)
    if args.workers > 1:
        return _supervise(args)
    if args.db:
        try:
            store = SQLiteStore(args.db)
        except TaskdError as exc:
            raise CliError(str(exc), EXIT_START) from None
    # Of --workers N, worker 0 alone runs the demo jobs.
    runs_demo = args.demo and worker in (None, "0")
    hosts = {h.strip().lower().strip("[]") for v in args.allow_host for h in v.split(",") if h}
    hosts.add(args.host.lower().strip("[]"))
    origins = {o.strip().rstrip("/") for v in args.cors_origin for o in v.split(",") if o}
    app = create_app(
        auth=bearer_auth(tokens) if tokens else None,
        store=store,
        retention=Retention(max_active_per_owner=args.max_active_per_owner),
        demo=runs_demo,
        demo_seed=_env("TASKD_DEMO_SEED", int, None),
        webhooks=webhooks,
        cancel_grace=args.cancel_grace,
        redis=args.redis,
        redis_prefix=args.redis_prefix,
        guard=BrowserGuard(
            check_host=not tokens, allowed_hosts=frozenset(hosts), cors_origins=frozenset(origins)
        ),
    )

    async def run() -> None:
        runner = ServeRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=args.keepalive_timeout,
            read_timeout=args.read_timeout,
            max_connections=max_connections,
        )
        try:
            await runner.setup()
        except TaskdError as exc:
            raise CliError(str(exc), EXIT_START) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _watch_supervisor(loop, stop)
        try:
            # Workers of one `--workers N` share the port: the kernel spreads
            # connections over them.
            site = web.TCPSite(
                runner, args.host, args.port, reuse_port=worker is not None, backlog=BACKLOG
            )
            try:
                await site.start()
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror}", EXIT_START
                ) from None
            host = f"[{args.host}]" if ":" in args.host else args.host
            log.info(
                "taskd %s serving on http://%s:%d (%s%s%s)",
                __version__,
                host,
                args.port,
                f"db {args.db}"
                if args.db
                else f"redis {_safe_url(args.redis)} prefix {args.redis_prefix!r}"
                if args.redis
                else "in memory",
                ", token auth" if tokens else "",
                ", demo jobs" if runs_demo else "",
            )
            await stop.wait()
            log.info("stopping: finishing running tasks")
        finally:
            await runner.cleanup()
        log.info("stopped")

    with asyncio.Runner(loop_factory=loop_factory) as loop_runner:
        loop_runner.run(run())
    return EXIT_OK


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line (time, level, logger, message,
    and ``task_id`` where the record names one), for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            out["task_id"] = task_id
        worker = getattr(record, "worker", None)
        if worker is not None:
            out["worker"] = worker
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _configure_logging(args: argparse.Namespace, worker: str | None = None) -> None:
    """Log to stderr as ``--log-format`` says; a worker of ``--workers N`` says which
    one it is on every line (``taskd worker 2:``, or ``"worker": 2`` in JSON)."""
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        name = "%(name)s" if worker is None else f"%(name)s worker {worker}"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    if worker is not None:
        index = int(worker)

        def label(record: logging.LogRecord) -> bool:
            record.worker = index
            return True

        handler.addFilter(label)
    logging.basicConfig(level=args.log_level, handlers=[handler])


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--loop`` names: None for asyncio's own."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise CliError(
            "--loop uvloop needs the uvloop package: pip install 'aiotaskd[uvloop]'", EXIT_START
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """A malformed request from a client is the client's problem: aiohttp answers it
    400 and would log a traceback at ERROR; log one line at INFO instead."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and exc.code < 500:
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args, record.exc_info, record.exc_text = (
            "bad request from a client: %s",
            (" ".join(str(exc.message).split())[:200],),
            None,
            None,
        )
    return True


def _safe_url(url: str) -> str:
    """The URL without its password, for the log and for errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable: hide whatever sits between the scheme and the last "@".
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


_REDIS_FLAG = "--redis (env TASKD_REDIS)"


def _check_redis_url(url: str) -> None:
    """A ``--redis`` URL redis-py will take, else one line naming the flag (exit 1).

    redis-py's own errors ("Port could not be cast to integer value") name neither
    the flag nor the fix, and surface only once the app starts."""
    shown = _safe_url(url)
    try:
        check_redis_url(url)
    except ValueError:
        raise CliError(
            f"{_REDIS_FLAG} must be a redis://, rediss:// or unix:// URL, not {shown!r}",
            EXIT_START,
        ) from None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        problem = (
            "its IPv6 address is not closed by ']'"
            if "IPv6" in str(exc)
            else "its port is not a number from 0 to 65535"
        )
        raise CliError(
            f"{_REDIS_FLAG}: {shown!r} is not a usable URL: {problem} "
            "(redis://[:PASSWORD@]HOST:PORT/DB)",
            EXIT_START,
        ) from None
    if parts.scheme == "unix":
        if not parts.path:
            raise CliError(
                f"{_REDIS_FLAG}: {shown!r} names no socket path (unix:///PATH)", EXIT_START
            )
        return
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise CliError(
            f"{_REDIS_FLAG}: {shown!r}: the database after the port must be a number "
            "(redis://HOST:PORT/0)",
            EXIT_START,
        )


def _check_redis(url: str) -> None:
    """Ping Redis once before serving: a Redis that cannot be reached, wants a
    password or refuses the one given is one line in taskd's words naming the flag,
    instead of Redis's own ("NOAUTH HELLO must be called with the client already
    authenticated …")."""
    try:
        import redis
        from redis.exceptions import AuthenticationError, RedisError
    except ImportError:  # pragma: no cover - depends on the installation
        raise CliError(
            "--redis needs the redis package: pip install 'aiotaskd[redis]'", EXIT_START
        ) from None

    parts = urlsplit(url)
    where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
    client = redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=5.0, retry=None, health_check_interval=0
    )
    try:
        client.ping()
    except AuthenticationError as exc:
        text = str(exc).lower()
        if "without any password" in text or "no password is set" in text:
            problem = "has no password set but the URL gives one: remove it from the URL"
        elif parts.password is None:
            problem = "requires a password: give it in the URL (redis://:PASSWORD@HOST:PORT/0)"
        else:
            problem = "refused the user name or password in the URL (wrong password?)"
        raise CliError(f"{_REDIS_FLAG}: Redis at {where} {problem}", EXIT_START) from None
    except (RedisError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__
        reason = (
            cause.strerror.lower()
            if isinstance(cause, OSError) and cause.strerror
            else "it did not answer in 5 s"
            if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
            else " ".join(str(exc).split())
        )
        raise CliError(
            f"{_REDIS_FLAG}: the shared store (Redis) at {where} cannot be reached: {reason}",
            EXIT_START,
        ) from None
    finally:
        client.close()


def _child_argv(argv: list[str]) -> list[str]:
    """The command line minus ``--workers``: each worker is one process."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _check_port_free(host: str, port: int) -> None:
    """Bind the port once without ``SO_REUSEPORT``: it fails if anything listens there
    (another server, or the workers of another ``--workers`` supervisor, which would
    otherwise share the port with ours). One line, before any worker starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: {exc.strerror} (--host)", EXIT_START
        ) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {host}:{port}: {exc.strerror} (--port)", EXIT_START
                ) from None


def _watch_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a worker of ``--workers N``: stop when the supervisor dies, however it died.

    The supervisor holds the write end of a pipe and never writes; the kernel closes
    it when the supervisor exits, even on SIGKILL, and this worker then reads end of
    file. A thread blocked in ``read`` needs nothing from the event loop, so it works
    on any loop and even if the loop is stuck: after asking for a clean stop it gives
    the worker ``_ORPHAN_DEADLINE`` seconds, then ends the process."""
    text = os.environ.get(_PIPE_ENV)
    if not text:
        return
    fd = int(text)

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        log.warning("the supervisor is gone: stopping this worker")
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(stop.set)
        time.sleep(_ORPHAN_DEADLINE)
        log.error("still running %gs after the supervisor died: exiting", _ORPHAN_DEADLINE)
        logging.shutdown()
        os._exit(EXIT_START)

    threading.Thread(target=watch, name="taskd-supervisor-watch", daemon=True).start()


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: run N copies of this command on one port (SO_REUSEPORT) and
    stop them together. A worker that dies is started again; one that cannot start
    stops them all (exit 1). Workers watch a pipe from the supervisor and stop when
    it dies (SIGKILL included); the supervisor kills workers that do not stop."""
    if not args.redis:
        raise CliError(
            "--workers needs --redis: separate processes share tasks only through Redis",
            EXIT_START,
        )
    if args.port == 0:
        raise CliError("--workers needs a fixed --port (not 0)", EXIT_START)
    _check_port_free(args.host, args.port)
    argv = [sys.executable, "-m", "taskd", *_child_argv(list(args.argv))]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The read end goes to every worker; the write end (close-on-exec) stays here, so
    # that it closes exactly when this process ends.
    watch_fd, lifeline = os.pipe()

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            **{_WORKER_ENV: str(index), "TASKD_WORKERS": "1", _PIPE_ENV: str(watch_fd)},
        )
        return subprocess.Popen(argv, env=env, pass_fds=(watch_fd,))

    procs = {i: start(i) for i in range(args.workers)}
    started = {i: time.monotonic() for i in procs}
    log.info("taskd %s: %d workers on port %d", __version__, args.workers, args.port)
    status = EXIT_OK
    while not stopping:
        time.sleep(0.1)
        for i, proc in list(procs.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            if code == EXIT_START and time.monotonic() - started[i] < 10:
                log.error("worker %d could not start; stopping", i)
                status = EXIT_START
                stopping = True
                break
            log.warning("worker %d exited with %s; starting it again", i, code)
            procs[i] = start(i)
            started[i] = time.monotonic()
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_DEADLINE
    for i, proc in procs.items():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in %gs: killing it", i, _STOP_DEADLINE)
            proc.kill()
            proc.wait()
    os.close(watch_fd)
    os.close(lifeline)
    return status
