"""Every Redis key of a deployment, named once (arq's ``constants.py`` is the model).

Each key is the deployment's base, ``{prefix}`` (one hash tag, so one deployment
lives in one Redis Cluster slot), followed by one of the suffixes below; a suffix
ending in ``:`` takes a name after it. The script (``script.lua``) gets them as its
``K`` table (``lua_table``, rendered into it by ``space``), and the Python side uses
these constants: no key is spelled anywhere else (``tests/test_redis.py`` checks).

The legend: what each key holds, its Redis type, and who writes it. "script" is
``script.lua`` (every write of a record goes through it, atomically); "tally" is
``tally.lua``, part of the same library, called by the script in the same call that
moves a task (a count is written with the transition it counts).

=================  ===========  =====================================================
key                type         holds (writer)
=================  ===========  =====================================================
``rec:<id>``       string       the record: a JSON object of the text fields named by
                                ``codec.REDIS_FIELDS`` (script; read with GET/MGET)
``all``            sorted set   every id, score 0, walked by lex: ids sort in creation
                                order (script)
``s:<status>``     sorted set   ids by status (script)
``y:<type>``       sorted set   ids by task type (script)
``o:<owner>``      sorted set   ids by owner (script)
``unowned``        sorted set   ids of tasks without an owner (script)
``r:<resource>``   sorted set   ids by resource id (script)
``c:<id>``         sorted set   the ids of a task's children (docs/trees.md), score 0,
                                walked by lex (script)
``live``           hash         task id → its number of active descendants, all
                                depths; only tasks that have some (script)
``kept``           set          finished tasks past their TTL, kept while a
                                descendant is active; removed once none is (script)
``n``              hash         counts by (type, status), a newline between them (script)
``active``         string       the number of active tasks (script)
``ao``             hash         active tasks per owner scope, for the quota (script)
``dk``             hash         active dedup keys: (owner, type, resource) → id (script)
``exp``            sorted set   TTL expiry deadlines of finished tasks (script)
``hb``             sorted set   heartbeat deadlines (script)
``gr``             sorted set   cancel-grace deadlines of cancelling tasks (script)
``x``              stream       the change stream: one entry per record version,
                                ``ENTRY_*`` fields, trimmed to ``STREAM_LEN`` (script;
                                read by every process's ``background`` reader)
``ob``             stream       the webhook outbox, consumer group ``GROUP`` (script;
                                consumed, acked and deleted by ``background``)
``seq``            string       the change counter: the stream's entry ids (script)
``epoch``          string       the counter's first value (script)
``stamp``          string       the last id timestamp, in microseconds (script)
``pk``             string       the page-token key, hex, made once with ``SET NX``
                                (``space.page_key``)
``procs``          set          the processes that run spawned tasks (script,
                                ``background.announce``)
``alive:<proc>``   string       a process's liveness key, with a ``PX`` expiry
                                (``background.announce``; deleted on close by
                                ``engine``)
``runs:<proc>``    set          the spawned tasks a process runs (script)
``note:<id>``      channel      sharded pub/sub: each change of a task, the whole
                                version (script ``SPUBLISH``; followed by the
                                processes holding waiters or event streams of it)
``pnote:<proc>``   channel      the same for every task a process runs (followed by
                                that process, for cancels and outcomes from elsewhere)
``fin``            hash         tasks finished by (type, status), a newline between
                                them; never decremented (tally)
``hr``, ``hw``     hash         run and wait time histograms, by slot and type (a
                                newline between): slot 1 … ``len(BUCKETS)`` + 1 (the
                                last +Inf) counts one bucket, slot ``s`` is the sum
                                in whole microseconds (tally)
``types``          set          the task types with series of their own, at most
                                ``MAX_TASK_TYPES``; later ones count as ``_other``
                                (tally)
``fpm:<hour>``     hash         tasks finished per minute, one hash per hour (Unix
                                time // 3600): (minute, status), a newline between
                                them, → count; expires ``MINUTES_TTL`` after its
                                first count (tally)
``shards``         hash         on a Redis Cluster, every shard that ever held a task:
                                its code (in its ids) → its base (``engine``, before
                                its first write there; ``shards`` has the legend)
``ps:<proc>``      string       a process's own series (``ProcessSeries`` as JSON),
                                with the liveness key's ``PX`` expiry (``engine``:
                                with its sweep, about once a second, and before it
                                answers ``Stats``; deleted on close)
=================  ===========  =====================================================
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACTIVE",
    "ACTIVE_BY_OWNER",
    "ALIVE",
    "ALL",
    "BY_OWNER",
    "BY_PARENT",
    "BY_RESOURCE",
    "BY_STATUS",
    "BY_TYPE",
    "CHANGES",
    "COUNTS",
    "DEDUP",
    "ENTRY_ID",
    "ENTRY_PAYLOAD",
    "ENTRY_RECORD",
    "ENTRY_STATUS",
    "EPOCH",
    "EXPIRY",
    "FINISHED",
    "GRACE",
    "GROUP",
    "HEARTBEATS",
    "KEPT",
    "KEYS",
    "LIVE",
    "MINUTES_TTL",
    "OUTBOX",
    "PAGE_KEY",
    "PER_MINUTE",
    "PROCS",
    "RECORD",
    "RUNS",
    "RUN_SECONDS",
    "SEQ",
    "SERIES",
    "SHARDS",
    "STAMP",
    "UNOWNED",
    "TASK_NOTES",
    "PROC_NOTES",
    "TASK_TYPES",
    "WAIT_SECONDS",
    "lua_table",
]

RECORD: Final = "rec:"
ALL: Final = "all"
BY_STATUS: Final = "s:"
BY_TYPE: Final = "y:"
BY_OWNER: Final = "o:"
UNOWNED: Final = "unowned"
BY_RESOURCE: Final = "r:"
BY_PARENT: Final = "c:"
LIVE: Final = "live"
KEPT: Final = "kept"
COUNTS: Final = "n"
ACTIVE: Final = "active"
ACTIVE_BY_OWNER: Final = "ao"
DEDUP: Final = "dk"
EXPIRY: Final = "exp"
HEARTBEATS: Final = "hb"
GRACE: Final = "gr"
CHANGES: Final = "x"
OUTBOX: Final = "ob"
SEQ: Final = "seq"
EPOCH: Final = "epoch"
STAMP: Final = "stamp"
PAGE_KEY: Final = "pk"
PROCS: Final = "procs"
ALIVE: Final = "alive:"
RUNS: Final = "runs:"
TASK_NOTES: Final = "note:"
PROC_NOTES: Final = "pnote:"
FINISHED: Final = "fin"
RUN_SECONDS: Final = "hr"
WAIT_SECONDS: Final = "hw"
TASK_TYPES: Final = "types"
PER_MINUTE: Final = "fpm:"
SERIES: Final = "ps:"
SHARDS: Final = "shards"

#: Every key suffix above, by its constant's name (the script's ``K`` table).
KEYS: Final = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, str)
}

# The fields of a change stream entry (``x``) and of an outbox entry (``ob``: only
# the record): the version's id and status, the version as JSON text without its
# payload (``codec.PAYLOAD``), and "1" when it had one (a reader reads it back).
ENTRY_ID: Final = "i"
ENTRY_STATUS: Final = "s"
ENTRY_RECORD: Final = "r"
ENTRY_PAYLOAD: Final = "p"
#: The outbox's consumer group.
GROUP: Final = "webhooks"
#: Seconds an hour's ``PER_MINUTE`` hash lives after its first count: the chart
#: reads the last 60 minutes, so an hour's hash is read until the end of the next.
MINUTES_TTL: Final = 3 * 3600

_ENTRY: Final = {
    "ENTRY_ID": ENTRY_ID,
    "ENTRY_STATUS": ENTRY_STATUS,
    "ENTRY_RECORD": ENTRY_RECORD,
    "ENTRY_PAYLOAD": ENTRY_PAYLOAD,
}


def lua_table() -> str:
    """The key suffixes and entry fields as the script's ``K`` table."""
    items = {**KEYS, **_ENTRY}
    assert all("'" not in v and "\\" not in v for v in items.values())
    return "local K = {" + ", ".join(f"{n} = '{v}'" for n, v in sorted(items.items())) + "}"
