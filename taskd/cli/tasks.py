"""The client commands, which talk to a running server through ``TaskdClient``:
``list``, ``get``, ``wait``, ``cancel`` and ``watch``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .._args import parse_statuses
from .._models import TaskRecord, TaskStatus
from ..client import DEFAULT_URL, ServerUnreachable, TaskdClient
from ._common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_START,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CliError,
    add_command,
    positive,
    typed,
)
from ._render import STYLE, print_record, safe, short, table

__all__ = ["add_parsers", "check_url", "run"]


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


def check_url(args: argparse.Namespace) -> None:
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``list``, ``get``, ``wait``, ``cancel`` and ``watch``, each with
    ``--url``, ``--token`` and ``--json``."""

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
        p.add_argument("--parent", dest="parent_id", help="only the children of this task")
        p.add_argument(
            "--limit", type=typed(int, "an integer"), default=limit, help="how many tasks, 1-200"
        )

    ls = add_command(
        sub,
        "list",
        "list tasks, newest first",
        "One page of tasks, newest first. When more exist, the command says so and "
        "prints the --page-token that fetches the next page.",
    )
    client_options(ls)
    filters(ls, 50)
    ls.add_argument("--page-token", help="the page after a previous listing (it prints this)")

    get = add_command(sub, "get", "show one task", "Show one task, field by field.")
    client_options(get)
    get.add_argument("task_id", help="the task's id")

    wait = add_command(
        sub,
        "wait",
        "follow a task to its end with a progress bar",
        "A live progress bar until the task ends, then its result or error. Exit status "
        "0 completed, 1 failed, 2 cancelled, 124 --timeout ran out.",
    )
    client_options(wait)
    wait.add_argument("task_id", help="the task's id")
    wait.add_argument(
        "--timeout",
        type=typed(positive, "a positive number of seconds"),
        default=None,
        help="give up after this many seconds (exit 124)",
    )

    cancel = add_command(
        sub,
        "cancel",
        "cancel a task",
        "Cancel a task; prints its new status (cancelling or cancelled).",
    )
    client_options(cancel)
    cancel.add_argument("task_id", help="the task's id")

    delete = add_command(
        sub,
        "delete",
        "delete finished tasks in bulk",
        "Delete your finished (completed, failed, cancelled) tasks matching the filters, "
        "at least one; active tasks are never deleted. Prints how many.",
    )
    client_options(delete)
    delete.add_argument(
        "--status", action="append", help="only these statuses (repeatable or comma-separated)"
    )
    delete.add_argument("--type", dest="task_type", help="only this task_type")
    delete.add_argument("--resource", dest="resource_id", help="only this resource_id")
    delete.add_argument(
        "--before",
        type=typed(float, "a Unix time in seconds"),
        default=None,
        metavar="S",
        help="only tasks created before this Unix time (seconds)",
    )

    watch = add_command(
        sub,
        "watch",
        "live view of task changes",
        "A live table of the newest tasks as they change (one JSON line per change with "
        "--json), until Ctrl-C.",
    )
    client_options(watch)
    filters(watch, 20)


def _statuses(values: Sequence[str] | None) -> list[str] | None:
    try:
        parsed = parse_statuses(values or ())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return None if parsed is None else sorted(parsed)


async def _list(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    page = await client.list(
        status=_statuses(args.status),
        task_type=args.task_type,
        resource_id=args.resource_id,
        limit=args.limit,
        page_token=args.page_token,
        parent_id=args.parent_id,
    )
    if args.json:
        # One document with the token in it: a script pages without reading stderr.
        tasks = [r.to_dict() for r in page.records]
        print(json.dumps({"tasks": tasks, "next_page_token": page.next_page_token}))
        return EXIT_OK
    if page.records:
        console.print(table(page.records, console.width))
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
        print_record(console, rec)
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
            "", total=1.0, kind=safe(rec.task_type), status="", style="white", message=""
        )

        def show(rec: TaskRecord) -> None:
            progress.update(
                bar,
                completed=rec.progress or 0.0,
                status=rec.status.value,
                style=STYLE[rec.status.value],
                message=short(rec.message, 40),
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
        console.print(Text(f"result: {safe(json.dumps(rec.result))}"), highlight=False)
    else:
        line = Text(rec.status.value, style=STYLE[rec.status.value])
        if rec.error and rec.error != rec.status.value:  # not "cancelled: cancelled"
            line.append(f": {safe(rec.error)}", style="")
        console.print(line, highlight=False)
    return _exit_for(rec)


async def _cancel(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    rec = await client.cancel(args.task_id)
    if args.json:
        print(json.dumps(rec.to_dict()))
    else:
        line = Text(f"{rec.task_id}: ")
        line.append(rec.status.value, style=STYLE[rec.status.value])
        console.print(line, highlight=False)
    return EXIT_OK


async def _delete(client: TaskdClient, args: argparse.Namespace, console: Console) -> int:
    statuses, before = _statuses(args.status), args.before
    if statuses is None and args.task_type is None and args.resource_id is None and before is None:
        raise CliError("delete needs at least one filter: --status, --type, --resource or --before")
    deleted = await client.delete_many(
        status=statuses, task_type=args.task_type, resource_id=args.resource_id, before=before
    )
    if args.json:
        print(json.dumps({"deleted": deleted}))
    else:
        console.print(f"deleted {deleted}", highlight=False)
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
            parent_id=args.parent_id,
        )
        latest.update((r.task_id, r) for r in page.records)

    def view() -> Table:
        newest = sorted(latest.values(), key=lambda r: r.task_id, reverse=True)[: args.limit]
        for stale in set(latest) - {r.task_id for r in newest}:
            del latest[stale]
        return table(newest, console.width)

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


_COMMANDS: Final = {
    "list": _list,
    "get": _get,
    "wait": _wait,
    "cancel": _cancel,
    "delete": _delete,
    "watch": _watch,
}


async def run(args: argparse.Namespace) -> int:
    """Run a client command with parsed arguments; returns the exit status."""
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
