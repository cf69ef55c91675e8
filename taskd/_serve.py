"""``taskd serve``: build the standalone app from the command line and run it until
SIGINT or SIGTERM (docs/cli.md). Imported only by that subcommand."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
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
    from .web._server import ServeRunner, quiet_accept_errors, raise_fd_limit

    _configure_logging(args)
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    quiet_accept_errors()
    raise_fd_limit()
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
        try:
            check_redis_url(args.redis)
            check_prefix(args.redis_prefix)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_START) from None
    worker = os.environ.get(_WORKER_ENV)
    if args.workers > 1:
        return _supervise(args)
    if args.db:
        try:
            store = SQLiteStore(args.db)
        except TaskdError as exc:
            raise CliError(str(exc), EXIT_START) from None
    hosts = {h.strip().lower().strip("[]") for v in args.allow_host for h in v.split(",") if h}
    hosts.add(args.host.lower().strip("[]"))
    origins = {o.strip().rstrip("/") for v in args.cors_origin for o in v.split(",") if o}
    app = create_app(
        auth=bearer_auth(tokens) if tokens else None,
        store=store,
        retention=Retention(max_active_per_owner=args.max_active_per_owner),
        demo=args.demo and worker in (None, "0"),
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
        )
        try:
            await runner.setup()
        except TaskdError as exc:
            raise CliError(str(exc), EXIT_START) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            # Workers of one `--workers N` share the port: the kernel spreads
            # connections over them.
            site = web.TCPSite(runner, args.host, args.port, reuse_port=worker is not None)
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
                ", demo jobs" if args.demo else "",
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
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
    """The URL without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


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


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: run N copies of this command on one port (SO_REUSEPORT) and
    stop them together. A worker that dies is started again; one that cannot start
    stops them all (exit 1)."""
    _configure_logging(args)
    if not args.redis:
        raise CliError(
            "--workers needs --redis: separate processes share tasks only through Redis",
            EXIT_START,
        )
    if args.port == 0:
        raise CliError("--workers needs a fixed --port (not 0)", EXIT_START)
    argv = [sys.executable, "-m", "taskd", *_child_argv(list(args.argv))]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, **{_WORKER_ENV: str(index), "TASKD_WORKERS": "1"})
        return subprocess.Popen(argv, env=env)

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
    for proc in procs.values():
        proc.wait()
    return status
