"""Parsing requests: JSON bodies, fields, query parameters, filters, page tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
from collections.abc import Mapping
from typing import Final, TypeVar, cast

from aiohttp import web

from .._args import check_resource_id, check_task_type, check_unicode, parse_statuses
from .._models import JSON
from ._errors import _ClientGone, _invalid

log = logging.getLogger("taskd.web")
T = TypeVar("T")

# --- parsing ----------------------------------------------------------------------------


async def _body(request: web.Request, allowed: frozenset[str]) -> dict[str, JSON]:
    """The JSON object body (``{}`` when empty); unknown fields are refused."""
    try:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    except ConnectionResetError:
        # The client hung up mid-body: nobody is left to answer; end quietly.
        raise _ClientGone() from None
    if not raw.strip():
        return {}
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _invalid("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise _invalid("request body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}", fields=list(unknown))
    return data


def _field(
    data: Mapping[str, object], name: str, kind: type[T], *, required: bool = False
) -> T | None:
    value = data.get(name)
    if value is None:
        if required:
            raise _invalid(f"field {name!r} is required", field=name)
        return None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _invalid(f"field {name!r} must be {_TYPE_NAMES[kind]}", field=name)
    if isinstance(value, str):
        try:
            check_unicode(value, f"field {name!r}")
        except ValueError as exc:
            raise _invalid(str(exc), field=name) from None
    # checked just above: ``value`` is an instance of ``kind`` (an int for a float)
    return cast(T, value)


_TYPE_NAMES: Final[dict[type, str]] = {
    str: "a string",
    float: "a number",
    dict: "an object",
    bool: "a boolean",
}


def _one_query(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _invalid(f"query parameter {name!r} given more than once", parameter=name)
    return values[0] if values else None


def _number_query(request: web.Request, name: str) -> float | None:
    text = _one_query(request, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(f"query parameter {name!r} must be a number", parameter=name) from None
    if not math.isfinite(value):
        raise _invalid(f"query parameter {name!r} must be finite", parameter=name)
    return value


def _filters(request: web.Request) -> tuple[list[str] | None, str | None, str | None]:
    """The listing filters of a request (list and events share them), checked."""
    # An empty value means no filter, as clients send ``task_type=`` for "any".
    task_type = _one_query(request, "task_type") or None
    resource_id = _one_query(request, "resource_id") or None
    if task_type is not None:
        check_task_type(task_type)
    check_resource_id(resource_id)
    return _statuses(request), task_type, resource_id


def _statuses(request: web.Request) -> list[str] | None:
    try:
        parsed = parse_statuses(request.query.getall("status", []))
    except ValueError as exc:
        raise _invalid(str(exc), parameter="status") from None
    return None if parsed is None else sorted(parsed)


# --- page tokens ------------------------------------------------------------------------

#: A token longer than this was not made here (ours are ~120 characters).
_MAX_TOKEN: Final = 512
_BAD_TOKEN: Final = (
    "page_token is not valid for this listing: pass next_page_token of the previous "
    "page, with the same filters"
)


def _filter_digest(
    statuses: list[str] | None,
    task_type: str | None,
    resource_id: str | None,
    stage: str | None = None,
    parent_id: str | None = None,
) -> str:
    """The listing's filters as the token's MAC covers them (ASCII: escapes any
    character, lone surrogates included); ``stage`` and ``parent_id`` only when
    given, so tokens made before they existed stay valid."""
    filters: list[object] = [statuses, task_type, resource_id]
    if stage is not None or parent_id is not None:
        filters.append(stage)
    if parent_id is not None:
        filters.append(parent_id)
    return json.dumps(filters, separators=(",", ":"))


def _mac(key: bytes, cursor: str, digest: str) -> str:
    # The cursor and the filters, length-prefixed: no split of one string can pass
    # for another. json.dumps escapes every non-ASCII character, so this never fails.
    text = json.dumps([cursor, digest], separators=(",", ":"))
    return hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()[:32]


def _encode_token(cursor: str, digest: str, key: bytes) -> str:
    """A page token: the cursor, signed with the deployment's key (``Tracker.page_key``)
    over the cursor and the filters, so that nobody can make one up."""
    raw = json.dumps({"c": cursor, "m": _mac(key, cursor, digest)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, digest: str, key: bytes) -> str:
    """The cursor of a token this deployment made for these filters; anything else —
    undecodable, forged, from another deployment or listing — is 400."""
    try:
        if len(token) > _MAX_TOKEN:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        cursor: object = data["c"]
        mac: object = data["m"]
        if not isinstance(cursor, str) or not isinstance(mac, str):
            raise TypeError("not text")
        if hmac.compare_digest(mac.encode("ascii"), _mac(key, cursor, digest).encode()):
            return cursor
    except (ValueError, KeyError, TypeError, UnicodeError):
        pass
    raise _invalid(_BAD_TOKEN, parameter="page_token")
