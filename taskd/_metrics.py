"""Prometheus exposition of the tracker's counters, with ``prometheus_client``.

The library renders the text format (escaping, HELP/TYPE lines, content type), so
what ``/metrics`` emits is exactly what Prometheus parses. Values are a snapshot taken
through one ``Stats`` message per scrape; nothing is counted on the actor's hot path
beyond what it keeps anyway. Task families (``taskd_tasks*``, ``taskd_records``,
``taskd_active_tasks``) are the records' engine's: with Redis, the deployment's.
Per-process families carry a ``process`` label when the processes are named (Redis:
every live process's series), none otherwise (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics import exposition as openmetrics

from ._counters import MAX_TASK_TYPES, OTHER, ProcessSeries, TaskCounters
from ._models import TaskStatus

__all__ = ["CONTENT_TYPE", "OPENMETRICS_CONTENT_TYPE", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics.CONTENT_TYPE_LATEST


class _Snapshot:
    def __init__(self, stats: Mapping[str, object]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        counters = stats.get("finished")
        counts = stats.get("counts", {})
        assert isinstance(counts, dict)
        tasks = GaugeMetricFamily(
            "taskd_tasks", "Tasks held, by status and type", labels=["status", "task_type"]
        )
        # Every status of every type seen reads 0 rather than vanishing: a panel
        # filtered to one type then shows 0, not "No data".
        seen = {t for t, _ in counts}
        if isinstance(counters, TaskCounters):
            seen |= counters.types()
        filled: dict[tuple[str, str], int] = {
            (t, s): counts.get((t, s), 0) for t in seen for s in TaskStatus
        }
        for (task_type, status), n in sorted(_capped(filled).items()):
            tasks.add_metric([TaskStatus(status).value, task_type], n)
        yield tasks
        for name, key, text in (
            ("taskd_active_tasks", "active", "Tasks pending, running or cancelling"),
            ("taskd_records", "records", "Task records held"),
        ):
            value = stats.get(key, 0)
            assert isinstance(value, int)
            yield GaugeMetricFamily(name, text, value=value)
        processes = stats.get("processes", [])
        assert isinstance(processes, list)
        yield from _process_families(processes)
        if isinstance(counters, TaskCounters):
            yield from _task_families(counters)


def _process_families(processes: list[ProcessSeries]) -> Iterator[Metric]:
    """The per-process families: one process's unlabelled (memory, SQLite), or every
    live process's with a ``process`` label (Redis)."""
    labelled = any(p.process is not None for p in processes)
    extra = ["process"] if labelled else []
    rows = sorted(processes, key=lambda p: p.process or "")

    def label(p: ProcessSeries) -> list[str]:
        return [p.process or ""] if labelled else []

    for name, text, value in (
        ("taskd_mailbox_depth", "Messages waiting in the actor's mailbox", _mailbox),
        ("taskd_subscriptions", "Open change subscriptions (watch, event streams)", _subs),
        ("taskd_waiters", "Long-polls and waits for an outcome pending", _waiters),
    ):
        gauge = GaugeMetricFamily(name, text, labels=extra)
        for p in rows:
            gauge.add_metric(label(p), value(p))
        yield gauge
    lag = GaugeMetricFamily(
        "taskd_event_loop_lag_seconds",
        "How late the event loop ran the actor's last timer (its lag, at that moment)",
        labels=extra,
    )
    for p in rows:
        lag.add_metric(label(p), p.loop_lag)
    yield lag
    commands = CounterMetricFamily(
        "taskd_commands", "Mailbox messages processed by the actor", labels=extra
    )
    for p in rows:
        commands.add_metric(label(p), p.commands)
    yield commands
    hooks = [(p, p.webhooks) for p in rows if p.webhooks is not None]
    if hooks:
        for i, key, text in (
            (0, "webhooks_delivered", "Webhooks delivered (a 2xx answer)"),
            (1, "webhooks_failed", "Webhooks given up after every attempt"),
        ):
            family = CounterMetricFamily(f"taskd_{key}", text, labels=extra)
            for p, counts in hooks:
                family.add_metric(label(p), counts[i])
            yield family
    http = CounterMetricFamily(
        "taskd_http_requests",
        "HTTP requests served, by method, route and status code",
        labels=["method", "route", "code", *extra],
    )
    seconds = HistogramMetricFamily(
        "taskd_http_request_duration_seconds",
        "Time from a request's arrival at taskd's middleware to its response, by "
        "method and route (long-polls and event streams included)",
        labels=["method", "route", *extra],
    )
    for p in rows:
        for (method, route, code), n in sorted(p.http.items()):
            http.add_metric([method, route, str(code), *label(p)], n)
        for (method, route), hist in sorted(p.durations.items()):
            seconds.add_metric([method, route, *label(p)], hist.cumulative(), hist.sum)
    yield http
    yield seconds


def _mailbox(p: ProcessSeries) -> int:
    return p.mailbox_depth


def _subs(p: ProcessSeries) -> int:
    return p.subscriptions


def _waiters(p: ProcessSeries) -> int:
    return p.waiters


def _task_families(counters: TaskCounters) -> Iterator[Metric]:
    finished = CounterMetricFamily(
        "taskd_tasks_finished",
        "Tasks that reached a terminal status, by type and status (with Redis, the "
        "deployment's total)",
        labels=["task_type", "status"],
    )
    for (task_type, status), n in sorted(counters.finished.items()):
        finished.add_metric([task_type, status], n)
    yield finished
    for name, families, text in (
        ("taskd_task_run_seconds", counters.run, "Seconds from started to finished, by type"),
        (
            "taskd_task_wait_seconds",
            counters.wait,
            "Seconds from created to started, by type (0 for spawned tasks)",
        ),
    ):
        hist = HistogramMetricFamily(name, text, labels=["task_type"])
        for task_type, h in sorted(families.items()):
            hist.add_metric([task_type], h.cumulative(), h.sum)
        yield hist


# At most MAX_TASK_TYPES distinct ``task_type`` label values; the rest are summed
# under ``_other``, so that clients creating many types cannot create unbounded series.


def _capped(counts: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    totals: dict[str, int] = {}
    for (task_type, _), n in counts.items():
        totals[task_type] = totals.get(task_type, 0) + n
    if len(totals) <= MAX_TASK_TYPES:
        return dict(counts)
    # The busiest types keep their own series (ties by name, so scrapes are stable).
    kept = set(sorted(totals, key=lambda t: (-totals[t], t))[:MAX_TASK_TYPES])
    out: dict[tuple[str, str], int] = {}
    for (task_type, status), n in counts.items():
        key = (task_type if task_type in kept else OTHER, status)
        out[key] = out.get(key, 0) + n
    return out


def render(stats: Mapping[str, object], *, accept: str = "") -> tuple[bytes, str]:
    """The exposition of one stats snapshot (``Tracker.stats()``) and its content
    type: OpenMetrics when the scraper's ``Accept`` asks for it (as Prometheus does),
    else the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    if "application/openmetrics-text" in accept:
        text: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        return text, OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE
