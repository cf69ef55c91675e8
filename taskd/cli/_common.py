"""What every ``taskd`` subcommand shares: the exit statuses, ``CliError``, and the
helpers that read flags and environment variables. Both command groups (``tasks``,
``serve``) import it; it imports neither, so the package has no cycle."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

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


class CliError(Exception):
    """A one-line error for stderr, and the exit status to leave with."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


_OWNER_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def parse_tokens(values: Sequence[str]) -> dict[str, str]:
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


def from_env(name: str, convert: Callable[[str], T], default: T) -> T:
    """An environment variable's value, converted; a bad one is a one-line error."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return convert(text)
    except ValueError:
        raise CliError(f"bad value {text!r} in environment variable {name}", EXIT_START) from None


def env_list(name: str) -> list[str]:
    """An environment variable as the default of an ``extend`` flag: one comma-separated
    value (split where it is used, as the flag's own values are), or none."""
    text = os.environ.get(name, "")
    return [text] if text.strip() else []


def port_number(text: str) -> int:
    """A TCP port, 1-65535."""
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


def positive(text: str) -> float:
    """A finite number above zero (seconds)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def typed(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    """An argparse ``type`` with a readable error."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what
    return parse


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every option's help."""


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand's parser: its one-line summary in ``taskd --help``, its
    description and defaults in ``taskd NAME --help``."""
    return sub.add_parser(name, help=summary, description=description, formatter_class=Help)
