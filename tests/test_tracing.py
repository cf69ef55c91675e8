"""OpenTelemetry (docs/tracing.md): a span per task, child of the span current at
spawn or create (or of an HTTP creator's ``traceparent``), with its attributes; the
record's ``traceparent``; webhooks carry it; on memory and on Redis, where another
process may end the task. Spans go to the SDK's in-memory exporter.

The SDK's provider is global and set once per process: it samples only while a test
here asks it to (``Switch``), so the rest of the suite runs untraced."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

import taskd
import taskd.web
from taskd.client import TaskdClient
from taskd.testing import eventually

from .conftest import Engine

Client = TestClient[web.Request, web.Application]


class Switch(Sampler):
    """Samples while ``on``: the tests here turn it on, the rest of the suite never."""

    on = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        """Record while on (the start attributes kept, as the SDK's samplers do)."""
        if not self.on:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, kwargs.get("attributes"))

    def get_description(self) -> str:
        return "taskd-tests"


_SWITCH = Switch()
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter, empty, with sampling on for this test."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=_SWITCH)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    _SWITCH.on = True
    try:
        yield _EXPORTER
    finally:
        _SWITCH.on = False


def task_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("taskd.task ")]


def traceparent_of(span: trace.Span | ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


async def test_a_span_per_task_child_of_the_callers_span(
    spans: InMemorySpanExporter, engine: Engine
) -> None:
    tracer = trace.get_tracer("tests")

    async def ok() -> int:
        return 1

    async def boom() -> None:
        raise RuntimeError("password=hunter2 broke")

    async with taskd.Tracker(**engine) as t, taskd.Tracker(**engine) as other:
        with tracer.start_as_current_span("request") as parent:
            good = await t.spawn(ok(), task_type="good")
            bad = await t.spawn(boom(), task_type="bad")
            ext = await t.create("ext")
        await good
        with pytest.raises(RuntimeError):
            await bad
        # ended through another tracker (on Redis: another process's, as it were)
        where = other if "redis" in engine or "redis_cluster" in engine else t
        await where.start(ext.task_id)
        await where.complete(ext.task_id, {"n": 1})
        await eventually(lambda: len(task_spans(spans)) == 3)
        untraced = await t.create("outside")  # no current span: a root span
        await t.cancel(untraced.task_id)
        await eventually(lambda: len(task_spans(spans)) == 4)
    by_type = {str((s.attributes or {})["taskd.task_type"]): s for s in task_spans(spans)}
    assert sorted(by_type) == ["bad", "ext", "good", "outside"]
    assert len(task_spans(spans)) == 4  # one span per task, whoever ended it
    for name in ("good", "bad", "ext"):
        s = by_type[name]
        assert s.name == f"taskd.task {name}"
        assert s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
        assert s.context is not None
        assert s.context.trace_id == parent.get_span_context().trace_id
    assert by_type["outside"].parent is None
    assert by_type["good"].attributes == {
        "taskd.task_type": "good",
        "taskd.task_id": good.task_id,
        "taskd.status": "completed",
    }
    failed = by_type["bad"]
    assert failed.attributes is not None
    assert failed.attributes["taskd.status"] == "failed"
    assert failed.attributes["taskd.error"] == "RuntimeError: password=[REDACTED] broke"
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert by_type["outside"].attributes["taskd.status"] == "cancelled"  # type: ignore[index]
    # the record keeps the span's context
    assert ext.traceparent == traceparent_of(by_type["ext"])
    assert good.record.traceparent == traceparent_of(by_type["good"])


async def test_untraced_without_a_recording_span(engine: Engine) -> None:
    """Sampling off (as when no provider is set): no span, and a creator's
    traceparent is kept as given, so workers and webhooks still carry the trace."""
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with taskd.Tracker(**engine) as t:
        rec = await t.create("x", traceparent=given)
        assert rec.traceparent == given
        assert (await t.create("y", traceparent="not-a-traceparent")).traceparent is None
        assert (await t.create("z")).traceparent is None
        got = await t.get(rec.task_id)
        assert got is not None and got.traceparent == given


@pytest.fixture
async def http(
    aiohttp_client: Callable[..., Awaitable[Client]], engine: Engine, receivers: Any
) -> tuple[Client, Any]:
    hooks = taskd.Webhooks(secret="s" * 24, allow=(f"127.0.0.1:{receivers.port}",))
    client = await aiohttp_client(taskd.web.create_app(webhooks=hooks, **engine))
    return client, receivers


@pytest.fixture
async def receivers(aiohttp_server: Any) -> Any:
    """A webhook receiver that keeps each delivery's headers and body."""
    got: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.json()))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    server.got = got
    return server


async def test_http_create_takes_the_callers_traceparent_and_webhooks_send_it(
    spans: InMemorySpanExporter, http: tuple[Client, Any]
) -> None:
    client, receiver = http
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await client.post(
        "/api/v1/tasks",
        json={"task_type": "job", "callback_url": str(receiver.make_url("/hook"))},
        headers={"traceparent": caller},
    )
    assert resp.status == 201, await resp.text()
    rec = (await resp.json())["result"]
    tid = rec["task_id"]
    # the task's span is the caller's child, in the caller's trace
    assert rec["traceparent"].split("-")[1] == caller.split("-")[1]
    assert rec["traceparent"] != caller
    resp = await client.post(f"/api/v1/tasks/{tid}/fail", json={"error": "no"})
    assert resp.status == 200
    await eventually(lambda: len(receiver.got) == 1)
    headers, body = receiver.got[0]
    assert headers["traceparent"] == rec["traceparent"] == body["traceparent"]
    (span,) = task_spans(spans)
    assert span.parent is not None and span.parent.span_id == int(caller.split("-")[2], 16)
    assert traceparent_of(span) == rec["traceparent"]
    # a traceparent that is not W3C trace context is ignored, not an error
    resp = await client.post(
        "/api/v1/tasks", json={"task_type": "job"}, headers={"traceparent": "garbage"}
    )
    assert resp.status == 201


async def test_the_client_sends_the_current_span(
    spans: InMemorySpanExporter, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await aiohttp_client(taskd.web.create_app())
    base = str(client.make_url("")).rstrip("/")
    tracer = trace.get_tracer("tests")
    async with TaskdClient(base) as c:
        with tracer.start_as_current_span("worker") as worker:
            rec = await c.create("job")
        token = context.attach(trace.set_span_in_context(trace.INVALID_SPAN))
        try:
            plain = await c.create("job")  # no current span: a root
        finally:
            context.detach(token)
        await c.cancel(rec.task_id)
        await c.cancel(plain.task_id)
    await eventually(lambda: len(task_spans(spans)) == 2)
    first, second = sorted(task_spans(spans), key=lambda s: s.start_time or 0)
    assert first.parent is not None
    assert first.parent.span_id == worker.get_span_context().span_id
    assert rec.traceparent == traceparent_of(first)
    assert second.parent is None


def _json_lines(raw: Sequence[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw]


async def test_tracing_without_a_provider_costs_no_span(engine: Engine) -> None:
    """The switch off (as in the rest of the suite): records carry no traceparent and
    nothing is held per task."""
    async with taskd.Tracker(**engine) as t:

        async def ok() -> int:
            await asyncio.sleep(0)
            return 1

        handle = await t.spawn(ok(), task_type="x")
        assert await handle == 1
        rec = await t.get(handle.task_id)
        assert rec is not None and rec.traceparent is None
        assert len(t._tracing or ()) == 0
