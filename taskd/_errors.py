"""The exceptions taskd raises, and the one table that maps them to the wire.

Every error that is taskd's own derives from :class:`TaskdError`::

    TaskdError
    ├── TaskNotFound         a call named an unknown, expired or evicted id   404 NOT_FOUND
    │                        (``hint``: another process minted it; no shared space)
    ├── TaskConflict         an active task holds (owner, task_type, resource_id)
    │                                                                    409 CONFLICT
    ├── InvalidTransition    the record's status does not allow the change
    │                                                         409 FAILED_PRECONDITION
    ├── QuotaExceeded        the owner's max_active_per_owner is reached 429 RESOURCE_EXHAUSTED
    ├── TrackerFull          the retention cap is full of active tasks   503 UNAVAILABLE
    ├── TrackerClosed        the tracker is not open, is closing, or its actor died
    │                                                                    503 UNAVAILABLE
    ├── StoreError           the store cannot be opened or written       503 UNAVAILABLE
    ├── taskd.client.ApiError          an error envelope with no class of its own
    └── taskd.client.ServerUnreachable the server could not be reached

Bad arguments are not ``TaskdError``: they raise the built-in ``ValueError`` or
``TypeError`` before any message reaches the actor (HTTP 400 ``INVALID_ARGUMENT``).

``ERRORS`` is the error table: code, HTTP status and meaning. The web layer's
middleware, ``TaskdClient`` and the OpenAPI document all read it, and each exception
carries its code, HTTP status and ``error_details()``; ``error_from_wire`` rebuilds the
exception from an envelope's code and details, so a client raises what the server did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ERRORS",
    "ErrorCode",
    "InvalidTransition",
    "QuotaExceeded",
    "StoreError",
    "TaskConflict",
    "TaskNotFound",
    "TaskdError",
    "TrackerClosed",
    "TrackerFull",
    "error_from_wire",
]

_Details = dict[str, "str | int | float | bool | None"]


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of the error table."""

    code: str
    http_status: int
    meaning: str
    #: Whether the answer carries ``Retry-After``.
    retry_after: bool = False


#: The error table, in HTTP status order. docs/http-api.md prints the same table.
ERRORS: Final[tuple[ErrorCode, ...]] = (
    ErrorCode("INVALID_ARGUMENT", 400, "bad query or body values, malformed JSON"),
    ErrorCode("UNAUTHENTICATED", 401, "auth is on and the credentials are missing or invalid"),
    ErrorCode("PERMISSION_DENIED", 403, "a cross-site request, or a Host that is not allowed"),
    ErrorCode("NOT_FOUND", 404, "unknown id, expired, evicted, or another owner's task"),
    ErrorCode("METHOD_NOT_ALLOWED", 405, "the path exists; the method does not (see Allow)"),
    ErrorCode("CONFLICT", 409, "an active task holds the same (task_type, resource_id)"),
    ErrorCode("FAILED_PRECONDITION", 409, "the transition is not allowed from the status"),
    ErrorCode("PAYLOAD_TOO_LARGE", 413, "the request body is over the limit"),
    ErrorCode("RESOURCE_EXHAUSTED", 429, "the owner's active-task quota is reached", True),
    ErrorCode("INTERNAL", 500, "a bug in taskd (logged; never a traceback)"),
    ErrorCode("UNAVAILABLE", 503, "full of active tasks, shutting down, or store down", True),
)
BY_CODE: Final = {e.code: e for e in ERRORS}
#: The code for an HTTP status that aiohttp raised on its own (404, 405, 413, ...).
CODE_FOR_STATUS: Final = {
    e.http_status: e.code for e in reversed(ERRORS) if e.code != "FAILED_PRECONDITION"
}


class TaskdError(Exception):
    """Base class of every error taskd raises on its own account.

    ``code`` and ``http_status`` say how the HTTP API answers it; ``error_details()``
    is the envelope's ``details`` object.
    """

    code: str = "INTERNAL"
    http_status: int = 500
    #: Seconds the server asked the client to wait (``Retry-After``), when it did.
    retry_after: float | None = None

    def error_details(self) -> _Details | None:
        """The structured details of the error envelope (None when there are none)."""
        return None

    @classmethod
    def _from_wire(cls, message: str, details: Mapping[str, object]) -> TaskdError:
        return cls(message)


def _text(details: Mapping[str, object], key: str) -> str:
    value = details.get(key)
    return value if isinstance(value, str) else ""


class TaskNotFound(TaskdError):
    """No visible task has this id (never existed, expired, evicted or another owner's).

    ``hint``, when set, says why the id cannot be found here: a process without a
    shared task space was asked for an id another process minted since it started
    (docs/scale-out.md). It depends on the id alone.
    """

    code = "NOT_FOUND"
    http_status = 404

    def __init__(self, task_id: str, hint: str | None = None) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id
        self.hint = hint

    def error_details(self) -> _Details:
        if self.hint is None:
            return {"task_id": self.task_id}
        return {"task_id": self.task_id, "hint": self.hint}

    @classmethod
    def _from_wire(cls, message: str, details: Mapping[str, object]) -> TaskdError:
        return cls(_text(details, "task_id"), _text(details, "hint") or None)


class TaskConflict(TaskdError):
    """An active task already holds the same (owner, task_type, resource_id) key.

    ``task_id`` names that active task so that callers can poll it instead.
    """

    code = "CONFLICT"
    http_status = 409

    def __init__(self, task_id: str, task_type: str, resource_id: str) -> None:
        super().__init__(
            f"an active {task_type!r} task for resource {resource_id!r} already exists: {task_id}"
        )
        self.task_id = task_id
        self.task_type = task_type
        self.resource_id = resource_id

    def error_details(self) -> _Details:
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "resource_id": self.resource_id,
        }

    @classmethod
    def _from_wire(cls, message: str, details: Mapping[str, object]) -> TaskdError:
        return cls(
            _text(details, "task_id"), _text(details, "task_type"), _text(details, "resource_id")
        )


class InvalidTransition(TaskdError):
    """The task's current status does not allow the requested change."""

    code = "FAILED_PRECONDITION"
    http_status = 409

    def __init__(self, task_id: str, current: str, action: str) -> None:
        super().__init__(f"cannot {action} task {task_id!r}: it is {current}")
        self.task_id = task_id
        self.current = current
        self.action = action

    def error_details(self) -> _Details:
        return {"task_id": self.task_id, "status": self.current, "action": self.action}

    @classmethod
    def _from_wire(cls, message: str, details: Mapping[str, object]) -> TaskdError:
        return cls(
            _text(details, "task_id"),
            _text(details, "status"),
            _text(details, "action") or "change",
        )


class QuotaExceeded(TaskdError):
    """The owner already has ``max_active_per_owner`` active tasks."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, owner: str | None, limit: int) -> None:
        super().__init__(f"the owner already has {limit} active tasks (max_active_per_owner)")
        self.owner = owner
        self.limit = limit

    def error_details(self) -> _Details:
        return {"limit": self.limit}

    @classmethod
    def _from_wire(cls, message: str, details: Mapping[str, object]) -> TaskdError:
        limit = details.get("limit")
        return cls(None, limit if isinstance(limit, int) else 0)


class _Unavailable(TaskdError):
    code = "UNAVAILABLE"
    http_status = 503

    def error_details(self) -> _Details:
        # by the class tree, so that a subclass (a user's, or a future engine's) keeps
        # its parent's reason rather than failing the error envelope
        reason = next(_REASONS[k] for k in type(self).__mro__ if k in _REASONS)
        return {"reason": reason}


class TrackerFull(_Unavailable):
    """Every slot of the retention cap holds an active task; nothing can be evicted."""


class TrackerClosed(_Unavailable):
    """The tracker does not take commands: not yet open, closing, closed, or its actor died."""


class StoreError(_Unavailable):
    """The store cannot be used: locked by another process, unreadable, unwritable,
    corrupt, of a newer schema, or failing to write."""


_REASONS: Final[dict[type[TaskdError], str]] = {
    TrackerFull: "tracker_full",
    TrackerClosed: "tracker_closed",
    StoreError: "store_unavailable",
}
_BY_REASON: Final = {reason: cls for cls, reason in _REASONS.items()}
_CLASSES: Final[dict[str, type[TaskdError]]] = {
    cls.code: cls for cls in (TaskNotFound, TaskConflict, InvalidTransition, QuotaExceeded)
}


def error_from_wire(code: str, message: str, details: Mapping[str, object]) -> TaskdError | None:
    """The exception an error envelope stands for, or None when the code has no class of
    its own (the client then raises ``ApiError``)."""
    if code == "UNAVAILABLE":
        cls = _BY_REASON.get(_text(details, "reason"))
        return None if cls is None else cls(message)
    found = _CLASSES.get(code)
    if found is None or (found is not QuotaExceeded and not _text(details, "task_id")):
        return None
    return found._from_wire(message, details)
