"""How the client commands show tasks on a terminal: the status colours, the task
table that narrows with the terminal, one record field by field, and task text made
safe to print."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._models import TaskRecord

__all__ = ["STYLE", "print_record", "safe", "short", "table"]

#: The colour of each status.
STYLE: Final = {
    "pending": "yellow",
    "running": "cyan",
    "cancelling": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "bright_black",
}


def safe(text: str) -> str:
    """Task text as it is: no markup, and control characters (ESC, OSC, C1, newlines)
    shown escaped, so that nothing a client stored can drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short(text: str | None, width: int = 60) -> str:
    if text is None:
        return ""
    text = safe(" ".join(text.split(" ")))
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


def table(records: Sequence[TaskRecord], width: int) -> Table:
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
            # the stage beside the status (``running:parsing``): where the work is
            "status": Text(
                rec.status.value + (f":{rec.stage}" if rec.stage else ""),
                style=STYLE[rec.status.value],
            ),
            "progress": Text("" if rec.progress is None else f"{rec.progress:.0%}"),
            # a parent's type with its number of children (``import +3``)
            "type": Text(
                safe(rec.task_type) + (f" +{sum(rec.children.values())}" if rec.children else "")
            ),
            "message / error": Text(short(rec.error if rec.error else rec.message)),
            "resource": Text(safe(rec.resource_id or "")),
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


def print_record(console: Console, rec: TaskRecord) -> None:
    width = max(len(k) for k in rec.to_dict())
    for key, value in rec.to_dict().items():
        line = Text(f"{key:<{width}}", style="bold")
        line.append("  ")
        shown = safe(value if isinstance(value, str) else json.dumps(value))
        line.append(shown, style=STYLE[str(value)] if key == "status" else "")
        console.print(line, highlight=False)
