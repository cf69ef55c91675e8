"""``taskd serve``: its flags, and the standalone app built from them and run until
SIGINT or SIGTERM (docs/cli.md). aiohttp and the stores are imported only when the
subcommand runs, so that the client commands start without them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime

from .. import __version__
from .._errors import TaskdError
from ..engine.redis.space import check_prefix
from ._common import (
    EXIT_OK,
    EXIT_START,
    CliError,
    add_command,
    count,
    env_list,
    from_env,
    parse_tokens,
    port_number,
    positive,
    typed,
)
from ._redis_check import check_reachable, check_url, safe_url
from ._workers import WORKER_ENV, supervise, watch_supervisor

__all__ = ["add_parsers", "run"]

#: How errors name the cluster flag.
CLUSTER_FLAG = "--redis-cluster (env TASKD_REDIS_CLUSTER)"

log = logging.getLogger("taskd")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and its flags; each flag's default comes from its environment
    variable (a bad value there is a ``CliError``, exit 1)."""
    serve = add_command(
        sub,
        "serve",
        "run the standalone service",
        "Run the task API, /health, /metrics and the dashboard. In memory unless --db is "
        "given. SIGINT/SIGTERM shut it down cleanly.",
    )
    serve.add_argument(
        "--host",
        default=os.environ.get("TASKD_HOST") or "127.0.0.1",
        help="bind address (env TASKD_HOST)",
    )
    serve.add_argument(
        "--port",
        type=typed(port_number, "a port number"),
        default=from_env("TASKD_PORT", port_number, 8080),
        help="port (env TASKD_PORT)",
    )
    serve.add_argument(
        "--db",
        default=os.environ.get("TASKD_DB") or None,
        help="SQLite file: durable tasks (env TASKD_DB)",
    )
    serve.add_argument(
        "--redis",
        default=os.environ.get("TASKD_REDIS") or None,
        metavar="URL",
        help="redis://HOST:PORT/DB: one task space shared by every process given it "
        "(env TASKD_REDIS)",
    )
    serve.add_argument(
        "--redis-cluster",
        default=os.environ.get("TASKD_REDIS_CLUSTER") or None,
        metavar="URL",
        help="redis://HOST:PORT of any node of a Redis Cluster: the shared task space "
        "sharded by owner (env TASKD_REDIS_CLUSTER)",
    )
    serve.add_argument(
        "--redis-prefix",
        default=os.environ.get("TASKD_REDIS_PREFIX") or "taskd:",
        metavar="P",
        help="key prefix in Redis: deployments with different prefixes share one Redis "
        "(env TASKD_REDIS_PREFIX)",
    )
    serve.add_argument(
        "--workers",
        type=typed(count, "a count >= 1"),
        default=from_env("TASKD_WORKERS", count, 1),
        metavar="N",
        help="run N processes on one port (SO_REUSEPORT); needs --redis (env TASKD_WORKERS)",
    )

    def many(flag: str, env: str, metavar: str, text: str) -> None:
        # One or more values per flag, the flag repeatable, the env comma-separated.
        serve.add_argument(
            flag,
            action="extend",
            nargs="+",
            default=env_list(env),
            metavar=metavar,
            help=f"{text} (repeatable; env {env}, comma-separated)",
        )

    many(
        "--token",
        "TASKD_TOKENS",
        "[OWNER=]TOKEN",
        "turn on bearer-token auth; a bare token belongs to owner 'default'",
    )
    serve.add_argument("--demo", action="store_true", help="also run simulated jobs")

    def seconds(flag: str, env: str, default: float, text: str) -> None:
        serve.add_argument(
            flag,
            type=typed(positive, "a positive number of seconds"),
            default=from_env(env, positive, default),
            metavar="S",
            help=f"{text} (env {env})",
        )

    seconds(
        "--cancel-grace",
        "TASKD_CANCEL_GRACE",
        60.0,
        "a cancelling task whose worker does not confirm in S seconds becomes cancelled",
    )
    serve.add_argument(
        "--max-active-per-owner",
        type=typed(count, "a count >= 1"),
        default=from_env("TASKD_MAX_ACTIVE_PER_OWNER", count, None),
        metavar="N",
        help="at most N active tasks per owner; more get 429 (env TASKD_MAX_ACTIVE_PER_OWNER)",
    )
    seconds(
        "--keepalive-timeout",
        "TASKD_KEEPALIVE_TIMEOUT",
        75.0,
        "close a connection idle for S seconds",
    )
    seconds(
        "--read-timeout",
        "TASKD_READ_TIMEOUT",
        30.0,
        "close a connection whose request (headers and body) has not arrived S seconds "
        "after its first byte",
    )
    serve.add_argument(
        "--max-connections",
        type=typed(count, "a count >= 1"),
        default=from_env("TASKD_MAX_CONNECTIONS", count, None),
        metavar="N",
        help="keep at most N connections open; at the cap a new one closes the oldest idle "
        "or half-open one; None: the open-file limit minus a headroom (env "
        "TASKD_MAX_CONNECTIONS)",
    )

    many(
        "--cors-origin",
        "TASKD_CORS_ORIGINS",
        "ORIGIN",
        "a foreign origin (https://app.example) allowed to make requests from a browser",
    )
    many(
        "--allow-host",
        "TASKD_ALLOW_HOSTS",
        "HOST",
        "without tokens, also answer requests with this Host header (loopback names and "
        "--host are always allowed)",
    )
    serve.add_argument(
        "--webhook-secret",
        default=os.environ.get("TASKD_WEBHOOK_SECRET") or None,
        help="sign webhooks with this secret, whsec_<base64> or plain (env TASKD_WEBHOOK_SECRET)",
    )
    serve.add_argument(
        "--webhook-allow",
        action="extend",
        nargs="+",
        default=env_list("TASKD_WEBHOOK_ALLOW"),
        metavar="HOST[:PORT]",
        help="allow callback_url targets on this host; [IPv6]:PORT for IPv6 (repeatable; "
        "env TASKD_WEBHOOK_ALLOW, comma-separated)",
    )
    serve.add_argument(
        "--log-format",
        default=os.environ.get("TASKD_LOG_FORMAT") or "text",
        choices=["text", "json"],
        help="text for people, json (one object per line) for log pipelines (env TASKD_LOG_FORMAT)",
    )
    serve.add_argument(
        "--loop",
        default=os.environ.get("TASKD_LOOP") or "asyncio",
        choices=["asyncio", "uvloop"],
        help="event loop: uvloop needs the uvloop extra (env TASKD_LOOP)",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("TASKD_LOG_LEVEL") or "INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (env TASKD_LOG_LEVEL)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``taskd serve`` with parsed arguments; returns the exit status."""
    from aiohttp import web

    from .._retention import Retention
    from .._webhooks import Webhooks, parse_allow_list
    from ..engine.sqlite import SQLiteStore
    from ..web import BrowserGuard, bearer_auth, create_app
    from ..web._guard import is_loopback
    from ..web._server import (
        BACKLOG,
        ServeRunner,
        connection_cap,
        quiet_accept_errors,
        raise_fd_limit,
    )

    worker = os.environ.get(WORKER_ENV)
    _configure_logging(args, worker)
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    quiet_accept_errors()
    max_connections = connection_cap(raise_fd_limit(), args.max_connections)
    tokens = parse_tokens(args.token)
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
    if args.redis and args.redis_cluster:
        raise CliError(
            "--redis and --redis-cluster are exclusive: give the one Redis or the cluster",
            EXIT_START,
        )
    shared, flag = (
        (args.redis_cluster, CLUSTER_FLAG) if args.redis_cluster else (args.redis, "--redis")
    )
    if args.db and shared:
        raise CliError(
            f"--db and {flag.split()[0]} are exclusive: with {flag.split()[0]}, Redis holds "
            "the tasks",
            EXIT_START,
        )
    if shared:
        check_url(shared, flag) if args.redis_cluster else check_url(shared)
        if args.redis_cluster and shared.startswith("unix:"):
            raise CliError(f"{flag} must be a redis:// or rediss:// URL", EXIT_START)
        try:
            check_prefix(args.redis_prefix)
        except ValueError as exc:
            raise CliError(f"--redis-prefix: {exc}", EXIT_START) from None
        if worker is None:
            # Once, before any worker starts: a Redis that cannot be used is one line
            # in taskd's words (not N workers' lines in Redis's words).
            check_reachable(shared, flag) if args.redis_cluster else check_reachable(shared)
    if args.workers > 1:
        return supervise(args)
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
        demo_seed=from_env("TASKD_DEMO_SEED", int, None),
        webhooks=webhooks,
        cancel_grace=args.cancel_grace,
        redis=args.redis,
        redis_cluster=args.redis_cluster,
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
        watch_supervisor(loop, stop)
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
                else f"redis {safe_url(args.redis)} prefix {args.redis_prefix!r}"
                if args.redis
                else f"redis cluster {safe_url(args.redis_cluster)} prefix {args.redis_prefix!r}"
                if args.redis_cluster
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
