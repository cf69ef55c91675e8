"""Tracing with OpenTelemetry (docs/tracing.md): a span per task.

With ``opentelemetry-api`` installed (``pip install 'aiotaskd[otel]'``) and a tracer
provider set by the application, each task gets a span named ``taskd.task
{task_type}``, a child of the span current where it was spawned or created (or of the
``traceparent`` an HTTP creator sent), from then until the task is terminal, with the
attributes ``taskd.task_id``, ``taskd.task_type``, ``taskd.status`` and, when it did
not complete, ``taskd.error`` (the record's error: already redacted). The record keeps
the span's W3C ``traceparent``, so a worker that reports over HTTP continues the
trace under it, and webhooks carry it as a header.

The span is kept by the process that created the task (``Tracing.opened``) and ended
when that process sees the task terminal: its own command or runner on any engine
and, on Redis, the notes of the tasks it traces (``engine.redis``). Without the
package there is no ``Tracing`` at all (``make`` returns None): every call site tests
for None first, so an untraced deployment pays one comparison per task.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from ._models import TaskRecord, TaskStatus

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["Tracing", "check_traceparent", "current_traceparent", "make"]

#: A W3C ``traceparent`` (version 00's layout; later versions may append fields).
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def check_traceparent(value: object) -> str | None:
    """``value`` if it is a valid W3C ``traceparent``, else None: an invalid one is
    ignored, as the W3C rules say (not an error)."""
    if not isinstance(value, str) or len(value) > 256:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None or m[1] == "ff" or (m[1] == "00" and m[5]):
        return None
    if set(m[2]) == {"0"} or set(m[3]) == {"0"}:
        return None
    return value


def make() -> Tracing | None:
    """A ``Tracing`` when OpenTelemetry's API is installed, else None."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return None
    return Tracing()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the span current here (what a client sends), or
    None (no OpenTelemetry, or no valid current span)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return _format(trace.get_current_span().get_span_context())


def _format(ctx: object) -> str | None:
    from opentelemetry.trace import SpanContext

    if not isinstance(ctx, SpanContext) or not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class Tracing:
    """The spans of one tracker's tasks (owned by the loop's thread)."""

    def __init__(self) -> None:
        import os

        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._proxy = trace.ProxyTracerProvider
        # ``get_tracer_provider`` reads the environment on every call until a provider
        # is set (7 µs a spawn); unless the environment names one, "none set yet" is
        # read from the API's global instead (then the call is made as before).
        self._lazy = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ or not hasattr(
            trace, "_TRACER_PROVIDER"
        )
        self._propagator = TraceContextTextMapPropagator()
        self._spans: dict[str, Span] = {}

    def start(self, task_type: str, traceparent: str | None) -> tuple[Span | None, str | None]:
        """In the creator's context: the task's span, child of ``traceparent`` if given
        (an HTTP creator's), else of the current span; and what the record keeps
        (the span's ``traceparent``; without a recording tracer, the one given)."""
        if not self._lazy and self._trace._TRACER_PROVIDER is None:
            return None, traceparent  # no provider set yet: nothing would record
        if isinstance(self._trace.get_tracer_provider(), self._proxy):
            return None, traceparent
        parent = None
        if traceparent is not None:
            parent = self._propagator.extract({"traceparent": traceparent})
        tracer = self._trace.get_tracer("taskd")
        span = tracer.start_span(f"taskd.task {task_type}", context=parent)
        if not span.is_recording():
            return None, traceparent
        # (set here, not at start: a sampler decides which start attributes are kept)
        span.set_attribute("taskd.task_type", task_type)
        return span, _format(span.get_span_context())

    def opened(self, span: object, task_id: str) -> None:
        """The task was created: its span is held until it is terminal."""
        if span is not None:
            span.set_attribute("taskd.task_id", task_id)  # type: ignore[attr-defined]
            self._spans[task_id] = span  # type: ignore[assignment]

    def holds(self, task_id: str) -> bool:
        """Whether this process holds the task's span (it is not terminal yet)."""
        return task_id in self._spans

    def held(self) -> list[str]:
        """The tasks whose spans this process holds."""
        return list(self._spans)

    def ended(self, rec: TaskRecord) -> None:
        """The task is terminal: end its span, if held here (once: it is let go)."""
        span = self._spans.pop(rec.task_id, None)
        if span is None:
            return
        span.set_attribute("taskd.status", rec.status.value)
        if rec.error is not None:
            span.set_attribute("taskd.error", rec.error)
        if rec.status is TaskStatus.FAILED:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, rec.error))
        span.end()

    def __len__(self) -> int:
        return len(self._spans)
