"""Checks of the values callers hand the tracker (JSON results and metadata, limits,
progress, messages, durations): each returns the value to keep or raises
``ValueError``/``TypeError`` with a message fit for a 400."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import cast

from ._args import check_unicode
from ._models import (
    EMPTY_METADATA,
    JSON,
    MAX_LIMIT,
    MAX_MESSAGE_CHARS,
    MAX_METADATA_BYTES,
    RawJSON,
)

__all__ = [
    "check_limit",
    "check_message",
    "check_metadata",
    "check_progress",
    "check_seconds",
    "json_copy",
    "store_json",
]


def _unicode_json(value: object, what: str) -> str:
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what} is not JSON-serialisable: {exc}") from None
    return check_unicode(text, what)


def json_copy(value: object, what: str) -> JSON:
    """Validate that ``value`` is JSON and return an independent copy of it.

    Copying once on the way in is what lets every later read share the record:
    the caller keeps no reference into the stored value.
    """
    kind = type(value)
    if value is None or kind is int or kind is bool:
        return cast(JSON, value)  # immutable and always valid JSON: nothing to copy
    if kind is str:
        return check_unicode(cast(str, value), what)
    if kind is float and math.isfinite(cast(float, value)):
        return cast(float, value)
    copied: JSON = json.loads(_unicode_json(value, what))
    return copied


def store_json(value: object, what: str) -> JSON | RawJSON:
    """``json_copy`` for a stored result: a container is kept as its compact text
    (``RawJSON``), a third to a quarter of its size as Python objects."""
    if isinstance(value, dict | list | tuple | Mapping):
        return _unicode_json(value, what).encode()
    return json_copy(value, what)


def check_metadata(metadata: object) -> Mapping[str, JSON]:
    """Return a private copy of ``metadata``: a JSON object of at most 16 KiB."""
    if metadata is None:
        return EMPTY_METADATA
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    if not metadata:
        return EMPTY_METADATA
    if not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata keys must be strings")
    text = _unicode_json(metadata, "metadata")
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must encode to at most {MAX_METADATA_BYTES} bytes")
    copied: dict[str, JSON] = json.loads(text)
    return MappingProxyType(copied)


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is an int from 1 to ``MAX_LIMIT`` (a listing's page size)."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def check_progress(progress: object) -> float | None:
    """Return ``progress`` as a float in [0, 1], or None."""
    if progress is None:
        return None
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise TypeError(f"progress must be a number, not {type(progress).__name__}")
    value = float(progress)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"progress must be between 0.0 and 1.0, got {progress!r}")
    return value


def check_message(message: object) -> str | None:
    """Return ``message`` if it is None or a str of at most 1024 characters without
    NUL. Other control characters (a newline, a tab) are kept as they are on every
    engine; the CLI and the dashboard show them escaped (docs/http-api.md)."""
    if message is None:
        return None
    if not isinstance(message, str):
        raise TypeError(f"message must be a str or None, not {type(message).__name__}")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"message must be at most {MAX_MESSAGE_CHARS} characters")
    if "\0" in message:
        # NUL ends strings in C, in terminals and in many log pipelines, and the
        # Redis wire uses a lone NUL for "no message": refused alike everywhere.
        raise ValueError("message must not contain NUL characters")
    return check_unicode(message, "message")


def check_seconds(value: object, name: str, *, allow_zero: bool = False) -> float | None:
    """Return ``value`` (seconds) as a finite float > 0 (>= 0 with ``allow_zero``), or
    None for None. Every duration option and argument goes through here."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and (number > 0 or (allow_zero and number == 0))):
        least = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {least}, got {value!r}")
    return number
