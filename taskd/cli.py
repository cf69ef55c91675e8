"""The ``taskd`` command: ``serve`` runs the standalone service; ``list``, ``get``,
``wait``, ``cancel`` and ``watch`` talk to a running one.

Exit status: 0 success (for ``wait``: the task completed); 1 the task failed
(``wait``); 2 the task was cancelled (``wait``) or the command line is wrong; 3 the
server could not answer the request (unreachable, 401, 404, …). Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from ._errors import TaskdError, TaskNotFound
from ._models import TaskRecord, TaskStatus
from .client import DEFAULT_URL, ApiError, ServerUnreachable, TaskdClient

__all__ = ["main"]

log = logging.getLogger("taskd")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CANCELLED: Final = 2
EXIT_ERROR: Final = 3

_STYLE: Final = {
    "pending": "yellow",
    "running": "cyan",
    "cancelling": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "bright_black",
}


class CliError(Exception):
    """A one-line error for stderr and exit status 3."""


# --- parsing -----------------------------------------------------------------------------


def _tokens(values: Sequence[str]) -> dict[str, str]:
    """``owner=token`` or a bare ``token`` (owner ``default``) -> {token: owner}."""
    out: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            owner, sep, token = item.partition("=")
            if not sep:
                owner, token = "default", item
            if not owner or not token:
                raise CliError(f"bad token {item!r}: use OWNER=TOKEN or TOKEN")
            out[token] = owner
    return out


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="taskd", description="Track background operations; serve and query them."
    )
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the standalone service")
    serve.add_argument("--host", default=env.get("TASKD_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env.get("TASKD_PORT", "8080")))
    serve.add_argument("--db", default=env.get("TASKD_DB"), help="SQLite file: durable tasks")
    serve.add_argument(
        "--token",
        action="extend",
        nargs="+",
        default=[env["TASKD_TOKENS"]] if env.get("TASKD_TOKENS") else [],
        metavar="[OWNER=]TOKEN",
        help="turn on bearer-token auth (repeatable); a bare token belongs to 'default'",
    )
    serve.add_argument("--demo", action="store_true", help="also run simulated jobs")
    serve.add_argument(
        "--webhook-secret",
        default=env.get("TASKD_WEBHOOK_SECRET"),
        help="sign webhooks with this secret (Standard Webhooks)",
    )
    serve.add_argument(
        "--webhook-allow",
        action="append",
        default=[env["TASKD_WEBHOOK_ALLOW"]] if env.get("TASKD_WEBHOOK_ALLOW") else [],
        metavar="HOST[:PORT]",
        help="allow callback_url targets on this host (repeatable)",
    )
    serve.add_argument(
        "--log-level", default=env.get("TASKD_LOG_LEVEL", "INFO"), help=argparse.SUPPRESS
    )

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=env.get("TASKD_URL", DEFAULT_URL))
        p.add_argument("--token", default=env.get("TASKD_TOKEN"), help="bearer token")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    ls = sub.add_parser("list", help="list tasks, newest first")
    client_options(ls)
    ls.add_argument("--status", action="append", help="repeatable or comma-separated")
    ls.add_argument("--type", dest="task_type")
    ls.add_argument("--resource", dest="resource_id")
    ls.add_argument("--limit", type=int, default=50)

    get = sub.add_parser("get", help="show one task")
    client_options(get)
    get.add_argument("task_id")

    wait = sub.add_parser("wait", help="follow a task to its end with a progress bar")
    client_options(wait)
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, default=None)

    cancel = sub.add_parser("cancel", help="cancel a task")
    client_options(cancel)
    cancel.add_argument("task_id")

    watch = sub.add_parser("watch", help="live view of task changes")
    client_options(watch)
    watch.add_argument("--status", action="append")
    watch.add_argument("--type", dest="task_type")
    watch.add_argument("--resource", dest="resource_id")
    watch.add_argument("--limit", type=int, default=20)
    return parser


# --- serve -------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ._webhooks import Webhooks, parse_allow_list
    from .web import bearer_auth, create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    tokens = _tokens(args.token)
    if not (0 < args.port < 65536):
        raise CliError(f"bad port {args.port}")
    if not tokens and not _is_loopback(args.host):
        log.warning(
            "taskd: serving on %s without tokens: anyone who can reach it sees every task",
            args.host,
        )
    store = None
    if args.db:
        from ._sqlite import SQLiteStore, StoreError

        try:
            store = SQLiteStore(args.db)
        except StoreError as exc:
            raise CliError(str(exc)) from None
    webhooks = None
    allow = parse_allow_list(args.webhook_allow)
    if args.webhook_secret:
        webhooks = Webhooks(secret=args.webhook_secret, allow=allow)
    elif allow:
        raise CliError("--webhook-allow needs --webhook-secret (or TASKD_WEBHOOK_SECRET)")
    app = create_app(
        auth=bearer_auth(tokens) if tokens else None,
        store=store,
        demo=args.demo,
        webhooks=webhooks,
    )

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        try:
            await runner.setup()
        except TaskdError as exc:
            raise CliError(str(exc)) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            site = web.TCPSite(runner, args.host, args.port)
            try:
                await site.start()
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
                ) from None
            host = f"[{args.host}]" if ":" in args.host else args.host
            log.info(
                "taskd %s serving on http://%s:%d (%s%s%s)",
                __version__,
                host,
                args.port,
                f"db {args.db}" if args.db else "in memory",
                ", token auth" if tokens else "",
                ", demo jobs" if args.demo else "",
            )
            await stop.wait()
            log.info("taskd stopping: finishing running tasks")
        finally:
            await runner.cleanup()
        log.info("taskd stopped")

    asyncio.run(run())
    return EXIT_OK


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- client commands ---------------------------------------------------------------------


def _statuses(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    valid = {s.value for s in TaskStatus}
    for v in out:
        if v not in valid:
            raise CliError(f"unknown status {v!r}; expected one of {', '.join(sorted(valid))}")
    return out


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(records: Sequence[TaskRecord]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in (
        "task_id",
        "type",
        "status",
        "progress",
        "resource",
        "updated",
        "message / error",
    ):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    for rec in records:
        status = rec.status.value
        progress = "" if rec.progress is None else f"{rec.progress:.0%}"
        detail = rec.error if rec.error else rec.message
        table.add_row(
            rec.task_id,
            rec.task_type,
            f"[{_STYLE[status]}]{status}[/]",
            progress,
            rec.resource_id or "",
            rec.updated_at_iso[11:19],
            _short(detail),
        )
    return table


def _print_record(console: Console, rec: TaskRecord) -> None:
    width = max(len(k) for k in rec.to_dict())
    for key, value in rec.to_dict().items():
        shown = value if isinstance(value, str) else json.dumps(value)
        if key == "status":
            shown = f"[{_STYLE[str(value)]}]{value}[/]"
        console.print(f"[bold]{key:<{width}}[/]  {shown}", highlight=False, markup=True)


async def _list(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    page = await client.list(
        status=_statuses(args.status),
        task_type=args.task_type,
        resource_id=args.resource_id,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in page.records]))
    elif page.records:
        console.print(_table(page.records))
    else:
        console.print("no tasks")
    return EXIT_OK


async def _get(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    rec = await client.get(args.task_id)
    if args.json:
        print(json.dumps(rec.to_dict()))
    else:
        _print_record(console, rec)
    return EXIT_OK


def _exit_for(rec: TaskRecord) -> int:
    if rec.status is TaskStatus.COMPLETED:
        return EXIT_OK
    if rec.status is TaskStatus.FAILED:
        return EXIT_FAILED
    return EXIT_CANCELLED


async def _wait(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    if args.json:
        rec = await client.wait(args.task_id, args.timeout)
        print(json.dumps(rec.to_dict()))
        return _exit_for(rec)
    rec = await client.get(args.task_id)
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    progress = Progress(
        TextColumn("[bold]{task.fields[kind]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("[{task.fields[style]}]{task.fields[status]}"),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        bar = progress.add_task(
            "", total=1.0, kind=rec.task_type, status="", style="white", message=""
        )
        while True:
            progress.update(
                bar,
                completed=rec.progress or 0.0,
                status=rec.status.value,
                style=_STYLE[rec.status.value],
                message=_short(rec.message, 40),
            )
            if rec.is_terminal:
                break
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise CliError(f"task {args.task_id} did not finish within {args.timeout:g}s")
            # Short long-polls keep the bar moving; the client rides out restarts.
            step = 1.0 if remaining is None else min(1.0, max(remaining, 0.01))
            try:
                rec = await client.poll(args.task_id, step)
            except (ServerUnreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status != 503:
                    raise
                await asyncio.sleep(1.0)
    if rec.status is TaskStatus.COMPLETED:
        console.print(f"result: {json.dumps(rec.result)}", highlight=False)
    elif rec.error:
        console.print(f"[red]{rec.status.value}:[/] {rec.error}", highlight=False)
    return _exit_for(rec)


async def _cancel(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    rec = await client.cancel(args.task_id)
    if args.json:
        print(json.dumps(rec.to_dict()))
    else:
        console.print(f"{rec.task_id}: [{_STYLE[rec.status.value]}]{rec.status.value}[/]")
    return EXIT_OK


async def _watch(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    """Follow ``GET /events``: a live table (or one JSON line per change), reconnecting
    with ``Last-Event-ID`` if the stream drops."""
    statuses = _statuses(args.status)
    latest: dict[str, TaskRecord] = {}
    if not args.json:
        page = await client.list(
            status=statuses,
            task_type=args.task_type,
            resource_id=args.resource_id,
            limit=args.limit,
        )
        latest.update((r.task_id, r) for r in page.records)

    def view() -> Table:
        newest = sorted(latest.values(), key=lambda r: r.task_id, reverse=True)[: args.limit]
        for stale in set(latest) - {r.task_id for r in newest}:
            del latest[stale]
        return _table(newest)

    live = None if args.json else Live(view(), console=console, auto_refresh=False)
    with live or contextlib.nullcontext():
        while True:
            stream = client.events(
                status=statuses,
                task_type=args.task_type,
                resource_id=args.resource_id,
                last_event_id=client.last_event_id,
            )
            try:
                async for rec in stream:
                    if live is None:
                        print(json.dumps(rec.to_dict()), flush=True)
                    else:
                        latest[rec.task_id] = rec
                        live.update(view(), refresh=True)
            except ServerUnreachable:
                pass
            await asyncio.sleep(1.0)  # the stream ended or dropped: resume it


_COMMANDS: Final = {"list": _list, "get": _get, "wait": _wait, "cancel": _cancel, "watch": _watch}


async def _client_command(args: argparse.Namespace) -> int:
    # Piped output gets long lines (one row per task) rather than 80-column wrapping.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
    if args.command == "watch":
        # watch runs until told to stop: SIGINT or SIGTERM ends it cleanly (exit 0),
        # even where SIGINT was ignored at start (a background job of a shell).
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
    async with TaskdClient(args.url, args.token) as client:
        try:
            return await _COMMANDS[args.command](client, args, console)
        except asyncio.CancelledError:
            if args.command != "watch":
                raise
            return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskd`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        try:
            return asyncio.run(_client_command(args))
        except KeyboardInterrupt:
            return EXIT_OK if args.command == "watch" else 130
    except CliError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
    except ServerUnreachable:
        print(f"taskd: cannot reach the server at {args.url}", file=sys.stderr)
    except TaskNotFound as exc:
        print(f"taskd: no such task: {exc.task_id}", file=sys.stderr)
    except ApiError as exc:
        hint = " (check --token / TASKD_TOKEN)" if exc.status == 401 else ""
        print(f"taskd: {exc.message} [{exc.code}]{hint}", file=sys.stderr)
    except TaskdError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
    except ValueError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _entry() -> None:
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
