"""Prometheus exposition of the tracker's counters, with ``prometheus_client``.

The library renders the text format (escaping, HELP/TYPE lines, content type), so
what ``/metrics`` emits is exactly what Prometheus parses. Values are a snapshot taken
through one ``Stats`` message per scrape; nothing is counted on the actor's hot path
beyond what it keeps anyway.
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

from ._counters import MAX_TASK_TYPES, OTHER, Histogram, TaskCounters
from ._models import TaskStatus

__all__ = ["CONTENT_TYPE", "OPENMETRICS_CONTENT_TYPE", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics.CONTENT_TYPE_LATEST


class _Snapshot:
    def __init__(
        self,
        stats: Mapping[str, object],
        http: Mapping[tuple[str, str, int], int],
        durations: Mapping[tuple[str, str], Histogram],
    ) -> None:
        self._stats = stats
        self._http = http
        self._durations = durations

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "taskd_tasks", "Tasks held, by status and type", labels=["status", "task_type"]
        )
        counts = self._stats.get("counts", {})
        assert isinstance(counts, dict)
        for (task_type, status), n in sorted(_capped(counts).items()):
            tasks.add_metric([TaskStatus(status).value, task_type], n)
        yield tasks
        for name, key, text in (
            ("taskd_mailbox_depth", "mailbox_depth", "Messages waiting in the actor's mailbox"),
            ("taskd_active_tasks", "active", "Tasks pending, running or cancelling"),
            ("taskd_records", "records", "Task records held"),
            ("taskd_subscriptions", "subscriptions", "Open change subscriptions"),
            ("taskd_waiters", "waiters", "Long-polls and waits for an outcome pending"),
        ):
            value = self._stats.get(key, 0)
            assert isinstance(value, int)
            yield GaugeMetricFamily(name, text, value=value)
        for key, text in (
            ("webhooks_delivered", "Webhooks delivered (a 2xx answer)"),
            ("webhooks_failed", "Webhooks given up after every attempt"),
        ):
            count = self._stats.get(key)
            if isinstance(count, int):
                yield CounterMetricFamily(f"taskd_{key}", text, value=count)
        commands = self._stats.get("commands", 0)
        assert isinstance(commands, int)
        yield CounterMetricFamily(
            "taskd_commands", "Mailbox messages processed by the actor", value=commands
        )
        http = CounterMetricFamily(
            "taskd_http_requests",
            "HTTP requests served, by method, route and status code",
            labels=["method", "route", "code"],
        )
        for (method, route, code), n in sorted(self._http.items()):
            http.add_metric([method, route, str(code)], n)
        yield http
        seconds = HistogramMetricFamily(
            "taskd_http_request_duration_seconds",
            "Time from a request's arrival at taskd's middleware to its response, by "
            "method and route (long-polls and event streams included)",
            labels=["method", "route"],
        )
        for (method, route), hist in sorted(self._durations.items()):
            seconds.add_metric([method, route], hist.cumulative(), hist.sum)
        yield seconds
        counters = self._stats.get("finished")
        if isinstance(counters, TaskCounters):
            yield from _task_families(counters)


def _task_families(counters: TaskCounters) -> Iterator[Metric]:
    finished = CounterMetricFamily(
        "taskd_tasks_finished",
        "Tasks that reached a terminal status, by type and status (counted by the "
        "process that recorded the transition)",
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


def render(
    stats: Mapping[str, object],
    http: Mapping[tuple[str, str, int], int],
    durations: Mapping[tuple[str, str], Histogram],
    *,
    accept: str = "",
) -> tuple[bytes, str]:
    """The exposition of one stats snapshot and its content type: OpenMetrics when
    the scraper's ``Accept`` asks for it (as Prometheus does), else the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, http, durations))
    if "application/openmetrics-text" in accept:
        text: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        return text, OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE
