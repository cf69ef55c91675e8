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
import sys
from collections.abc import Sequence
from difflib import get_close_matches

from .. import __version__
from .._errors import TaskdError, TaskNotFound
from ..client import DEFAULT_URL, ApiError, ServerUnreachable
from . import serve, tasks
from ._common import EXIT_ERROR, EXIT_OK, CliError, Help

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskd",
        description="Track background operations: run the service (serve) or talk to one.",
        epilog="Exit status: 0 ok; 1 task failed (wait) or serve could not start; "
        "2 task cancelled (wait) or bad command line; 3 request failed; 124 wait timed out.",
        formatter_class=Help,
    )
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # serve first: the order of ``taskd --help``.
    serve.add_parsers(sub)
    tasks.add_parsers(sub)
    return parser


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
            tasks.check_url(args)
        url = getattr(args, "url", url)
        if args.command == "serve":
            return serve.run(args)
        try:
            return asyncio.run(tasks.run(args))
        except KeyboardInterrupt:
            return EXIT_OK if args.command == "watch" else 130
    except CliError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return exc.status
    except ServerUnreachable:
        print(f"taskd: cannot reach the server at {url}", file=sys.stderr)
    except TaskNotFound as exc:
        # The hint (if any) names the likely cause: servers without a shared task space.
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"taskd: no such task: {exc.task_id}{hint}", file=sys.stderr)
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
