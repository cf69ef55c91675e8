"""The task record, its transition table and argument checks."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from types import MappingProxyType

import msgspec
import pytest

import taskd
from taskd import TaskStatus as S
from taskd._models import TRANSITIONS, Extra, Held

ALL = list(S)
ALLOWED = {
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLING),
    (S.RUNNING, S.CANCELLED),
    (S.CANCELLING, S.CANCELLED),
    (S.CANCELLING, S.COMPLETED),
    (S.CANCELLING, S.FAILED),
}


def test_transition_table_is_exactly_the_spec() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED


def test_status_is_a_str_enum_with_spec_values() -> None:
    assert [s.value for s in S] == [
        "pending",
        "running",
        "cancelling",
        "completed",
        "failed",
        "cancelled",
    ]
    assert S("failed") == "failed"


def test_record_is_frozen_slotted_and_untracked_by_gc() -> None:
    rec = taskd.TaskRecord("t1", "x", S.PENDING, None, 1.0, 1.0)
    with pytest.raises(AttributeError):
        rec.status = S.RUNNING  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")
    # Held by the thousand, records stay out of the cyclic collector's walks.
    assert not gc.is_tracked(rec)
    assert not gc.is_tracked(taskd.TaskSpec(owner="a"))


def test_to_dict_has_every_spec_field_and_no_owner() -> None:
    rec = taskd.TaskRecord("t1", "x", S.PENDING, "r", 1.5, 2.25, spec=taskd.TaskSpec(owner="alice"))
    d = rec.to_dict()
    assert set(d) == {
        "task_id",
        "task_type",
        "status",
        "resource_id",
        "created_at",
        "updated_at",
        "created_at_iso",
        "updated_at_iso",
        "started_at",
        "finished_at",
        "progress",
        "message",
        "result",
        "error",
        "metadata",
        "history",
        "traceparent",
        "stage",
        "parent_id",
        "children",
    }
    assert d["traceparent"] is None and d["stage"] is None  # untraced, no stage
    assert d["parent_id"] is None and d["children"] == {}  # no parent, no children
    assert d["created_at_iso"] == "1970-01-01T00:00:01.500000Z"
    assert d["updated_at_iso"] == "1970-01-01T00:00:02.250000Z"
    assert d["status"] == "pending"
    assert "alice" not in json.dumps(d)


def test_history_lists_each_status_entered_with_its_instant() -> None:
    created = taskd.TaskRecord("t1", "x", S.PENDING, None, 1.0, 1.0)
    assert created.history == ((S.PENDING, 1.0),)
    failed = taskd.TaskRecord("t1", "x", S.FAILED, None, 1.0, 4.0, 2.0, 4.0, error="boom")
    assert failed.history == ((S.PENDING, 1.0), (S.RUNNING, 2.0), (S.FAILED, 4.0))
    # cancelled while pending: never started
    dropped = taskd.TaskRecord("t1", "x", S.CANCELLED, None, 1.0, 3.0, None, 3.0)
    assert dropped.to_dict()["history"] == [
        {"status": "pending", "at": 1.0},
        {"status": "cancelled", "at": 3.0},
    ]
    # spawned: running from its creation, no pending stage
    spawned = taskd.TaskRecord(
        "t1", "x", S.COMPLETED, None, 5.0, 6.0, 5.0, 6.0, spec=taskd.TaskSpec(in_process=True)
    )
    assert [s for s, _ in spawned.history] == [S.RUNNING, S.COMPLETED]


def test_control_character_rules_and_their_openapi_patterns_agree() -> None:
    """docs/http-api.md: resource ids refuse C0, DEL and C1 controls; messages refuse
    NUL only; the OpenAPI patterns say exactly the same."""
    import re

    from taskd._args import check_resource_id
    from taskd._checks import check_message
    from taskd._models import MESSAGE_PATTERN, RESOURCE_ID_PATTERN

    def refused(check: Callable[[str], object], text: str) -> bool:
        try:
            check(text)
        except ValueError:
            return True
        return False

    for code in range(0x00, 0x200):
        text = f"a{chr(code)}b"
        control = code < 0x20 or 0x7F <= code <= 0x9F
        assert refused(check_resource_id, text) is control, hex(code)
        assert (re.fullmatch(RESOURCE_ID_PATTERN, text) is None) is control, hex(code)
        assert refused(check_message, text) is (code == 0), hex(code)
        assert (re.fullmatch(MESSAGE_PATTERN, text) is None) is (code == 0), hex(code)


def _full_record() -> taskd.TaskRecord:
    # Every stored field set, each to a value no other field's column could hold.
    spec = taskd.TaskSpec(
        metadata={"k": [1, "v"]},
        owner="alice",
        in_process=True,
        callback_url="https://example.com/hook",
        heartbeat_timeout=7.5,
    )
    return taskd.TaskRecord(
        "t1", "typ", S.FAILED, "res", 1.25, 4.5, 2.0, 4.5, 0.5, "msg", None, "boom", spec
    )


def test_one_field_list_gives_the_json_keys_the_columns_and_the_redis_fields() -> None:
    """docs/architecture.md: the record's one field list (``_models.FIELDS``) is where
    the JSON keys, the SQLite columns and the Redis hash fields come from."""
    from taskd._models import FIELDS, JSON_KEYS
    from taskd.engine import codec

    rec = _full_record()
    assert list(rec.to_dict()) == [name for name, _, _, rendered in FIELDS if rendered]
    assert list(JSON_KEYS) == list(rec.to_dict())
    assert tuple(name for name, _, sql, _ in FIELDS if sql) == codec.COLUMNS
    assert tuple(short for _, short, _, _ in FIELDS if short) == codec.REDIS_FIELDS
    names = [name for name, _, _, _ in FIELDS]
    shorts = [short for _, short, _, _ in FIELDS if short]
    assert len(set(names)) == len(names) and len(set(shorts)) == len(shorts)
    # A stored field is an attribute of the record (the two Redis-only ones aside).
    for name, _, sql, _ in FIELDS:
        if sql:
            assert hasattr(rec, name), name
    assert set(codec.PAYLOAD) <= set(codec.STORED_FIELDS)


def test_a_row_holds_each_field_in_its_own_column_and_reads_back() -> None:
    from taskd.engine import codec

    rec = _full_record()
    row = dict(zip(codec.COLUMNS, codec.to_row(rec), strict=True))
    for name in codec.COLUMNS:
        value = getattr(rec, name)
        expected = {
            "status": rec.status.value,
            "result": None,
            "metadata": '{"k":[1,"v"]}',
            "in_process": 1,
            "children": None,  # none: no text
            "await_children": None,
            "held": None,
            "stages": None,
        }.get(name, value)
        assert row[name] == expected, name
    assert codec.from_row(codec.to_row(rec)) == rec
    # A parent waiting for its children: the counts and the held outcome read back.
    parent = msgspec.structs.replace(
        rec,
        status=S.RUNNING,
        spec=codec.new_spec({}, None, False, None, None, None, "p0", True),
        extra=Extra(
            MappingProxyType({"running": 2, "completed": 1}),
            Held(S.COMPLETED, b'{"n":3}'),  # an object result is held as its text
            (("fetching", 1.5, S.RUNNING), ("parsing", 2.0, S.CANCELLING)),
        ),
    )
    row = dict(zip(codec.COLUMNS, codec.to_row(parent), strict=True))
    assert row["children"] == '{"running":2,"completed":1}' and row["await_children"] == 1
    assert row["parent_id"] == "p0" and row["held"] == '{"st":"completed","rz":"{\\"n\\":3}"}'
    assert row["stages"] == '[["fetching",1.5,"running"],["parsing",2.0,"cancelling"]]'
    assert codec.from_row(codec.to_row(parent)) == parent
    # stage changes are in the JSON history, between the statuses, by instant
    history = parent.to_dict()["history"]
    assert isinstance(history, list)
    assert [e for e in history if "stage" in e] == [
        {"status": "running", "stage": "fetching", "at": 1.5},
        {"status": "cancelling", "stage": "parsing", "at": 2.0},
    ]
    ats = [e["at"] for e in history]
    assert ats == sorted(ats)
    done = taskd.TaskRecord("t2", "x", S.COMPLETED, None, 1.0, 2.0, 1.0, 2.0, 1.0, None, b"[1]")
    assert codec.from_row(codec.to_row(done)) == done
    # An array or object result is held as its compact text; a record built with the
    # decoded value reads back as text, with the same result.
    built = msgspec.structs.replace(done, result_data=[1])
    assert codec.from_row(codec.to_row(built)).result_data == b"[1]"
    assert codec.from_row(codec.to_row(built)).result == built.result == [1]
    assert codec.from_row(codec.to_row(done)).spec is codec.new_spec({}, None, False, None, None)


def test_a_redis_hash_reads_back_through_the_same_constructor() -> None:
    from taskd.engine import codec

    rec = _full_record()
    text = {
        short: str(value)
        for short, value in zip(codec.STORED_FIELDS, codec.to_row(rec), strict=True)
        if value is not None
    }
    assert codec.from_hash({**text, "sq": "42", "pr": "proc"}) == (rec, 42)
    plain = taskd.TaskRecord("t3", "x", S.PENDING, None, 1.0, 1.0)
    hashed = {"id": "t3", "ty": "x", "st": "pending", "ca": "1.0", "ua": "1.0"}
    got, seq = codec.from_hash(hashed)
    assert (got, seq) == (plain, 0) and got.spec is plain.spec


def test_new_spec_shares_the_default_and_keeps_every_other_value() -> None:
    from taskd._models import DEFAULT_SPEC, SPAWNED_SPEC
    from taskd.engine.codec import new_spec

    assert new_spec({}, None, False, None, None) is DEFAULT_SPEC
    # A spawned task's spec differs only by in_process: shared too, not one per spawn.
    assert new_spec({}, None, True, None, None) is SPAWNED_SPEC
    assert SPAWNED_SPEC.in_process and not DEFAULT_SPEC.in_process
    assert new_spec({}, None, True, "http://h/cb", None) is not SPAWNED_SPEC
    # An empty owner is an owner: not the default spec.
    assert new_spec({}, "", False, None, None).owner == ""
    assert new_spec({}, None, False, None, 0.5).heartbeat_timeout == 0.5
    assert new_spec({}, None, True, None, None).in_process
