"""Argument checks, run in the caller before any message is sent: task types,
stages, resource ids, status filters, ids and owners (``ValueError``/``TypeError``
with the argument named)."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from ._models import (
    ANY_OWNER,
    MAX_RESOURCE_ID_CHARS,
    TASK_TYPE_PATTERN,
    OwnerScope,
    TaskStatus,
)

__all__ = [
    "check_new_owner",
    "check_owner",
    "check_resource_id",
    "check_stage",
    "check_statuses",
    "check_task_id",
    "check_task_type",
    "check_unicode",
    "parse_statuses",
]

_TASK_TYPE_RE = re.compile(TASK_TYPE_PATTERN[1:-1])
# Control characters (C0, DEL and C1: \x9b is a terminal's one-byte CSI) would
# corrupt logs and terminal views of resource ids (docs/http-api.md).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Task types already validated (bounded): valid strings stay valid.
_KNOWN_TYPES: set[str] = set()


def parse_statuses(values: Iterable[str | TaskStatus]) -> frozenset[TaskStatus] | None:
    """A status filter from its parts: each value one status or several separated by
    commas; empty parts are ignored, and no status at all means no filter (None).
    ``ValueError`` names an unknown status. The one parser for the API, client and CLI.
    """
    out: set[TaskStatus] = set()
    for value in values:
        if isinstance(value, TaskStatus):
            out.add(value)
            continue
        if not isinstance(value, str):
            raise TypeError(f"status must be a str, not {type(value).__name__}")
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.add(TaskStatus(part))
            except ValueError:
                valid = ", ".join(s.value for s in TaskStatus)
                raise ValueError(f"unknown status {part!r}; expected one of {valid}") from None
    return frozenset(out) if out else None


def check_unicode(text: str, what: str) -> str:
    """Return ``text`` if it is valid Unicode: no lone UTF-16 surrogate (which a JSON
    escape such as backslash-u-d800 can carry), so that it can be encoded and stored."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return text


def check_task_type(task_type: object) -> str:
    """Return ``task_type`` if it is 1–128 chars of ``[A-Za-z0-9_.:-]``."""
    if type(task_type) is str and task_type in _KNOWN_TYPES:
        return task_type  # a program uses a handful of types: skip the regex
    if not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str, not {type(task_type).__name__}")
    if not _TASK_TYPE_RE.fullmatch(task_type):
        raise ValueError(
            f"task_type must be 1-128 characters of [A-Za-z0-9_.:-], got {task_type[:140]!r}"
        )
    if len(_KNOWN_TYPES) < 1024:
        _KNOWN_TYPES.add(task_type)
    return task_type


def check_stage(stage: object) -> str | None:
    """Return ``stage`` if it is None or follows ``task_type``'s rules (1–128
    characters of ``[A-Za-z0-9_.:-]``)."""
    if stage is None:
        return None
    if not isinstance(stage, str):
        raise TypeError(f"stage must be a str, not {type(stage).__name__}")
    if not _TASK_TYPE_RE.fullmatch(stage):
        raise ValueError(f"stage must be 1-128 characters of [A-Za-z0-9_.:-], got {stage[:140]!r}")
    return stage


def check_resource_id(resource_id: object) -> str | None:
    """Return ``resource_id`` if it is None or 1–256 printable characters."""
    if resource_id is None:
        return None
    if not isinstance(resource_id, str):
        raise TypeError(f"resource_id must be a str or None, not {type(resource_id).__name__}")
    if not 1 <= len(resource_id) <= MAX_RESOURCE_ID_CHARS:
        raise ValueError(f"resource_id must be 1-{MAX_RESOURCE_ID_CHARS} characters")
    if _CONTROL_RE.search(resource_id):
        raise ValueError("resource_id must not contain control characters")
    return check_unicode(resource_id, "resource_id")


def check_statuses(
    status: TaskStatus | str | Collection[TaskStatus | str] | None,
) -> frozenset[TaskStatus] | None:
    """A status filter (one status or several) as a set; None for no filter."""
    if status is None:
        return None
    parsed = parse_statuses([status] if isinstance(status, str) else list(status))
    if parsed is None:
        raise ValueError("status filter must name at least one status")
    return parsed


def check_task_id(task_id: object) -> str:
    """A task id argument: a str."""
    if not isinstance(task_id, str):
        raise TypeError(f"task_id must be a str, not {type(task_id).__name__}")
    return task_id


def check_owner(owner: object) -> OwnerScope:
    """An owner scope argument: ANY_OWNER, None or a str."""
    if owner is ANY_OWNER:
        return ANY_OWNER
    return check_new_owner(owner)


def check_new_owner(owner: object) -> str | None:
    """The owner of a new task: a str or None (not ANY_OWNER)."""
    if owner is not None and not isinstance(owner, str):
        raise TypeError(f"owner must be a str or None, not {type(owner).__name__}")
    return owner
