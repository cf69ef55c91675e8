"""The task record, its transition table and argument checks."""

from __future__ import annotations

import gc
import json

import pytest

import taskd
from taskd import TaskStatus as S
from taskd._models import TRANSITIONS

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
    }
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

    from taskd._models import (
        MESSAGE_PATTERN,
        RESOURCE_ID_PATTERN,
        check_message,
        check_resource_id,
    )

    def refused(check: object, text: str) -> bool:
        try:
            check(text)  # type: ignore[operator]
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
