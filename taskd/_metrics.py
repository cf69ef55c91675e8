"""Prometheus exposition of the tracker's counters, with ``prometheus_client``.

The library renders the text format (escaping, HELP/TYPE lines, content type), so
what ``/metrics`` emits is exactly what Prometheus parses. Values are a snapshot taken
through one ``Stats`` message per scrape; nothing is counted on the actor's hot path
beyond what it keeps anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._models import TaskStatus

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Snapshot:
    def __init__(
        self, stats: Mapping[str, object], http: Mapping[tuple[str, str, int], int]
    ) -> None:
        self._stats = stats
        self._http = http

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


#: At most this many distinct ``task_type`` label values; the rest are summed under
#: ``_other``, so that clients creating many types cannot create unbounded series.
MAX_TASK_TYPES = 100
OTHER = "_other"


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


def render(stats: Mapping[str, object], http: Mapping[tuple[str, str, int], int]) -> bytes:
    """The Prometheus text exposition of one stats snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, http))
    return generate_latest(registry)
