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
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from typing import Final, TypeVar
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from ._errors import TaskdError, TaskNotFound
from ._models import TaskRecord, TaskStatus, parse_statuses
from .client import DEFAULT_URL, ApiError, ServerUnreachable, TaskdClient

__all__ = ["main"]

log = logging.getLogger("taskd")
T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CANCELLED: Final = 2
EXIT_ERROR: Final = 3
#: ``wait --timeout`` ran out before the task ended (as ``timeout(1)`` does).
EXIT_TIMEOUT: Final = 124
#: ``serve`` could not start (bad option or environment value, db locked or
#: unreadable, port in use); client commands given a bad environment value.
EXIT_START: Final = 1
#: The command line is wrong (as argparse exits).
EXIT_USAGE: Final = 2

_STYLE: Final = {
    "pending": "yellow",
    "running": "cyan",
    "cancelling": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "bright_black",
}


class CliError(Exception):
    """A one-line error for stderr, and the exit status to leave with."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


# --- parsing -----------------------------------------------------------------------------

_OWNER_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _tokens(values: Sequence[str]) -> dict[str, str]:
    """``OWNER=TOKEN`` or a bare ``TOKEN`` (owner ``default``) -> {token: owner}.

    ``OWNER=TOKEN`` is recognised only when OWNER is 1–64 of ``[A-Za-z0-9_.@-]`` and
    TOKEN is non-empty and does not start with ``=``: a base64 token ending in ``==``
    is a bare token. One token for two owners is refused (naming the owners only).
    """
    out: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            owner, sep, token = item.partition("=")
            if not (sep and _OWNER_RE.fullmatch(owner) and token and not token.startswith("=")):
                owner, token = "default", item
            known = out.get(token)
            if known is not None and known != owner:
                raise CliError(
                    f"one token is given to two owners ({known!r} and {owner!r}): "
                    "each token must name one owner",
                    EXIT_START,
                )
            out[token] = owner
    return out


def _env(name: str, convert: Callable[[str], T], default: T) -> T:
    """An environment variable's value, converted; a bad one is a one-line error."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return convert(text)
    except ValueError:
        raise CliError(f"bad value {text!r} in environment variable {name}", EXIT_START) from None


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _arg(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    """An argparse ``type`` with a readable error."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what
    return parse


def _split_env(name: str) -> list[str]:
    text = os.environ.get(name, "")
    return [text] if text.strip() else []


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every option's help."""


class _UrlFlag(argparse.Action):
    """``--url``: notes that the value came from the flag, not from ``TASKD_URL``, so
    that an error names the one the user wrote."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.url_from_flag = True


def _check_url(args: argparse.Namespace) -> None:
    """A client command's server URL must be http(s)://…: ``localhost:8080`` would be
    read as a URL of scheme ``localhost``. One line naming ``--url`` (a usage error,
    exit 2) or ``TASKD_URL`` (a bad environment value, exit 1)."""
    url = args.url
    parts = urlsplit(url) if "://" in url else None
    if parts is not None and parts.scheme in ("http", "https") and parts.netloc:
        try:
            parts.port  # noqa: B018 - parsing the port is the check
            return
        except ValueError:
            pass
    looks_like_host = "://" not in url and ("." in url or ":" in url)
    hint = f" (did you mean http://{url}?)" if looks_like_host else ""
    if getattr(args, "url_from_flag", False):
        raise CliError(f"--url must be an http:// or https:// URL, not {url!r}{hint}", EXIT_USAGE)
    raise CliError(
        f"bad value {url!r} in environment variable TASKD_URL: it must be an http:// or "
        f"https:// URL{hint}",
        EXIT_START,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskd",
        description="Track background operations: run the service (serve) or talk to one.",
        epilog="Exit status: 0 ok; 1 task failed (wait) or serve could not start; "
        "2 task cancelled (wait) or bad command line; 3 request failed; 124 wait timed out.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, formatter_class=_Help)

    serve = command(
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
        type=_arg(_port, "a port number"),
        default=_env("TASKD_PORT", _port, 8080),
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
        "--redis-prefix",
        default=os.environ.get("TASKD_REDIS_PREFIX") or "taskd:",
        metavar="P",
        help="key prefix in Redis: deployments with different prefixes share one Redis "
        "(env TASKD_REDIS_PREFIX)",
    )
    serve.add_argument(
        "--workers",
        type=_arg(_count, "a count >= 1"),
        default=_env("TASKD_WORKERS", _count, 1),
        metavar="N",
        help="run N processes on one port (SO_REUSEPORT); needs --redis (env TASKD_WORKERS)",
    )

    def many(flag: str, env: str, metavar: str, text: str) -> None:
        # One or more values per flag, the flag repeatable, the env comma-separated.
        serve.add_argument(
            flag,
            action="extend",
            nargs="+",
            default=_split_env(env),
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
            type=_arg(_positive, "a positive number of seconds"),
            default=_env(env, _positive, default),
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
        type=_arg(_count, "a count >= 1"),
        default=_env("TASKD_MAX_ACTIVE_PER_OWNER", _count, None),
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
        type=_arg(_count, "a count >= 1"),
        default=_env("TASKD_MAX_CONNECTIONS", _count, None),
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
        default=_split_env("TASKD_WEBHOOK_ALLOW"),
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

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            action=_UrlFlag,
            default=os.environ.get("TASKD_URL") or DEFAULT_URL,
            help="the server's base URL, http(s)://HOST:PORT; a trailing /api/v1 is "
            "accepted (env TASKD_URL)",
        )
        p.add_argument(
            "--token",
            default=os.environ.get("TASKD_TOKEN") or None,
            help="bearer token (env TASKD_TOKEN)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def filters(p: argparse.ArgumentParser, limit: int) -> None:
        p.add_argument(
            "--status", action="append", help="only these statuses (repeatable or comma-separated)"
        )
        p.add_argument("--type", dest="task_type", help="only this task_type")
        p.add_argument("--resource", dest="resource_id", help="only this resource_id")
        p.add_argument(
            "--limit", type=_arg(int, "an integer"), default=limit, help="how many tasks, 1-200"
        )

    ls = command(
        "list",
        "list tasks, newest first",
        "One page of tasks, newest first. When more exist, the command says so and "
        "prints the --page-token that fetches the next page.",
    )
    client_options(ls)
    filters(ls, 50)
    ls.add_argument("--page-token", help="the page after a previous listing (it prints this)")

    get = command("get", "show one task", "Show one task, field by field.")
    client_options(get)
    get.add_argument("task_id", help="the task's id")

    wait = command(
        "wait",
        "follow a task to its end with a progress bar",
        "A live progress bar until the task ends, then its result or error. Exit status "
        "0 completed, 1 failed, 2 cancelled, 124 --timeout ran out.",
    )
    client_options(wait)
    wait.add_argument("task_id", help="the task's id")
    wait.add_argument(
        "--timeout",
        type=_arg(_positive, "a positive number of seconds"),
        default=None,
        help="give up after this many seconds (exit 124)",
    )

    cancel = command(
        "cancel",
        "cancel a task",
        "Cancel a task; prints its new status (cancelling or cancelled).",
    )
    client_options(cancel)
    cancel.add_argument("task_id", help="the task's id")

    watch = command(
        "watch",
        "live view of task changes",
        "A live table of the newest tasks as they change (one JSON line per change with "
        "--json), until Ctrl-C.",
    )
    client_options(watch)
    filters(watch, 20)
    return parser


# --- serve -------------------------------------------------------------------------------


# --- client commands ---------------------------------------------------------------------


def _statuses(values: Sequence[str] | None) -> list[str] | None:
    try:
        parsed = parse_statuses(values or ())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return None if parsed is None else sorted(parsed)


def _safe(text: str) -> str:
    """Task text as it is: no markup, and control characters (ESC, OSC, C1, newlines)
    shown escaped, so that nothing a client stored can drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return ""
    text = _safe(" ".join(text.split(" ")))
    return text if len(text) <= width else text[: width - 1] + "…"


#: Columns of the task table, dropped right to left as the terminal narrows; the id is
#: never cut, so it can be copied into ``taskd wait``.
_COLUMNS: Final = (
    "task_id",
    "status",
    "progress",
    "type",
    "message / error",
    "resource",
    "updated",
)


#: Columns that take at most this many characters: the message / error column gets
#: the rest of the width.
_CAPPED: Final = {"type": 24, "resource": 24}
#: The message / error column is shown only with at least this many characters.
_MESSAGE_MIN: Final = 12


def _table(records: Sequence[TaskRecord], width: int) -> Table:
    """The task table for a terminal ``width`` wide.

    Every column but the message gets the width its text needs (type and resource at
    most ``_CAPPED``), so that ids stay whole and statuses readable; the message takes
    what is left. When even that does not fit, the right-hand columns go first
    (updated, resource, then message / error). rich, left to itself, would squeeze
    every column alike: ``fa…`` for ``failed`` while the message kept 50 characters.
    """
    rows = [
        {
            "task_id": Text(rec.task_id),
            "status": Text(rec.status.value, style=_STYLE[rec.status.value]),
            "progress": Text("" if rec.progress is None else f"{rec.progress:.0%}"),
            "type": Text(_safe(rec.task_type)),
            "message / error": Text(_short(rec.error if rec.error else rec.message)),
            "resource": Text(_safe(rec.resource_id or "")),
            "updated": Text(rec.updated_at_iso[11:19]),
        }
        for rec in records
    ]
    want = {
        c: min(max([len(c), *(row[c].cell_len for row in rows)]), _CAPPED.get(c, width))
        for c in _COLUMNS
    }
    message = "message / error"
    columns: tuple[str, ...] = _COLUMNS[:3]
    widths = {c: want[c] for c in columns}
    for keep in range(len(_COLUMNS), 3, -1):
        candidate = _COLUMNS[:keep]
        # Each column costs its text, one space either side and a separator between.
        fixed = sum(want[c] + 3 for c in candidate if c != message) - 1
        if message not in candidate:
            if fixed <= width:
                columns, widths = candidate, {c: want[c] for c in candidate}
                break
            continue
        room = width - fixed - 3
        if room >= min(_MESSAGE_MIN, want[message]):
            columns = candidate
            widths = {c: want[c] for c in candidate}
            widths[message] = min(want[message], room)
            break
    table = Table(show_edge=False, header_style="bold")
    for column in columns:
        if column == "task_id":
            table.add_column(column, no_wrap=True, min_width=widths[column], overflow="fold")
        else:
            w = widths[column]
            table.add_column(column, no_wrap=True, overflow="ellipsis", min_width=w, max_width=w)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    return table


def _print_record(console: Console, rec: TaskRecord) -> None:
    width = max(len(k) for k in rec.to_dict())
    for key, value in rec.to_dict().items():
        line = Text(f"{key:<{width}}", style="bold")
        line.append("  ")
        shown = _safe(value if isinstance(value, str) else json.dumps(value))
        line.append(shown, style=_STYLE[str(value)] if key == "status" else "")
        console.print(line, highlight=False)


async def _list(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    page = await client.list(
        status=_statuses(args.status),
        task_type=args.task_type,
        resource_id=args.resource_id,
        limit=args.limit,
        page_token=args.page_token,
    )
    if args.json:
        # One document with the token in it: a script pages without reading stderr.
        tasks = [r.to_dict() for r in page.records]
        print(json.dumps({"tasks": tasks, "next_page_token": page.next_page_token}))
        return EXIT_OK
    if page.records:
        console.print(_table(page.records, console.width))
    else:
        console.print("no tasks")
    if page.next_page_token is not None:
        # On stderr: the table on stdout stays the tasks alone.
        print(f"more tasks: add --page-token {page.next_page_token}", file=sys.stderr)
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
        try:
            rec = await client.wait(args.task_id, args.timeout)
        except TimeoutError:
            raise CliError(
                f"task {args.task_id} did not finish within {args.timeout:g}s", EXIT_TIMEOUT
            ) from None
        print(json.dumps(rec.to_dict()))
        return _exit_for(rec)
    rec = await client.get(args.task_id)
    progress = Progress(
        TextColumn("[bold]{task.fields[kind]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("[{task.fields[style]}]{task.fields[status]}"),
        TextColumn("{task.fields[message]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        bar = progress.add_task(
            "", total=1.0, kind=_safe(rec.task_type), status="", style="white", message=""
        )

        def show(rec: TaskRecord) -> None:
            progress.update(
                bar,
                completed=rec.progress or 0.0,
                status=rec.status.value,
                style=_STYLE[rec.status.value],
                message=_short(rec.message, 40),
            )

        show(rec)
        if not rec.is_terminal:
            # Short long-polls keep the bar moving; the client rides out restarts.
            try:
                async with contextlib.aclosing(
                    client.follow(args.task_id, timeout=args.timeout, step=1.0)
                ) as records:
                    async for rec in records:
                        show(rec)
            except TimeoutError:
                raise CliError(
                    f"task {args.task_id} did not finish within {args.timeout:g}s", EXIT_TIMEOUT
                ) from None
    if rec.status is TaskStatus.COMPLETED:
        console.print(Text(f"result: {_safe(json.dumps(rec.result))}"), highlight=False)
    else:
        line = Text(rec.status.value, style=_STYLE[rec.status.value])
        if rec.error and rec.error != rec.status.value:  # not "cancelled: cancelled"
            line.append(f": {_safe(rec.error)}", style="")
        console.print(line, highlight=False)
    return _exit_for(rec)


async def _cancel(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    rec = await client.cancel(args.task_id)
    if args.json:
        print(json.dumps(rec.to_dict()))
    else:
        line = Text(f"{rec.task_id}: ")
        line.append(rec.status.value, style=_STYLE[rec.status.value])
        console.print(line, highlight=False)
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
        return _table(newest, console.width)

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
    # Piped output gets long lines (one row per task), unless COLUMNS says otherwise.
    wide = sys.stdout.isatty() or os.environ.get("COLUMNS")
    console = Console(highlight=False, width=None if wide else 240)
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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line. An unknown option is reported by the subcommand it was
    given to (``taskd serve --prot``: ``taskd serve``'s usage, and ``--port`` as the
    likely one), not by the top level, whose usage lists only the subcommands."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
            args.command
        ]
        known = [o for a in sub._actions for o in a.option_strings]
        guess = get_close_matches(extras[0].partition("=")[0], known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        sub.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskd`` console script; returns the exit status."""
    url = DEFAULT_URL
    try:
        args = _parse(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command != "serve":
            _check_url(args)
        url = getattr(args, "url", url)
        if args.command == "serve":
            from ._serve import serve

            return serve(args)
        try:
            return asyncio.run(_client_command(args))
        except KeyboardInterrupt:
            return EXIT_OK if args.command == "watch" else 130
    except CliError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return exc.status
    except ServerUnreachable:
        print(f"taskd: cannot reach the server at {url}", file=sys.stderr)
    except TaskNotFound as exc:
        print(f"taskd: no such task: {exc.task_id}", file=sys.stderr)
    except ApiError as exc:
        if exc.status == 404 or exc.code == "HTTP_ERROR":
            # Not a task's 404 (that is TaskNotFound): no taskd API at that URL.
            print(
                f"taskd: {url} answered HTTP {exc.status} where the taskd API should be: "
                "check --url / TASKD_URL (the server's URL, e.g. http://127.0.0.1:8080)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        hint = " (check --token / TASKD_TOKEN)" if exc.status == 401 else ""
        print(f"taskd: {exc.message} [{exc.code}]{hint}", file=sys.stderr)
    except TaskdError as exc:
        print(f"taskd: {exc} [{exc.code}]", file=sys.stderr)
    except ValueError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _entry() -> None:
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
