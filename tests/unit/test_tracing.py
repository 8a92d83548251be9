"""TracingObserver without services: the span of a transaction told its life by hand
(as the coordinator's fan-out does), on a private TracerProvider whose spans are kept
in memory."""

from __future__ import annotations

import asyncio
import threading

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coordinator import AlreadyCommitted, Error, OutcomeUnknown, Phase, RolledBack, Status
from coordinator.observe import Observer, TransactionInfo, TransactionObserver
from coordinator.tracing import SPAN_NAME, TracingObserver

GID = "pk2pc2:orders:i1:0:2:17:0123456789ab:" + "f" * 32


@pytest.fixture
def observer(provider: TracerProvider) -> TracingObserver:
    return TracingObserver(tracer_provider=provider,
                           propagator=TraceContextTextMapPropagator())


def info(key: str | None = None,
         consumed: tuple[tuple[tuple[str, bytes], ...], ...] = ()) -> TransactionInfo:
    return TransactionInfo("orders", "i1", "a" * 32, key, consumed)


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = [s for s in exporter.get_finished_spans() if s.name == SPAN_NAME]
    assert len(spans) == 1, spans
    return spans[0]


def traceparent(span: trace.Span | ReadableSpan) -> bytes:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{format_trace_id(ctx.trace_id)}-{format_span_id(ctx.span_id)}-01".encode()


def ids(header: bytes) -> str:
    """A traceparent's trace id and parent id (the flags vary with the SDK)."""
    version, trace_id, span_id, _flags = header.decode().split("-")
    assert version == "00"
    return f"{trace_id}-{span_id}"


def test_it_implements_the_observer_protocols(observer: TracingObserver) -> None:
    o: Observer = observer
    tx: TransactionObserver = o.transaction(info())
    tx.end(Status.COMMITTED, None, None, 0.0)


def test_a_committed_transaction(observer: TracingObserver, provider: TracerProvider,
                                 exporter: InMemorySpanExporter) -> None:
    outer = provider.get_tracer("test").start_span("request")
    with trace.use_span(outer, end_on_exit=True):
        tx = observer.transaction(info(key="order-42"))
    tx.phase(Phase.BEGIN, 0.001)
    tx.phase(Phase.PREPARE, 0.002)
    tx.prepared(GID)
    tx.phase(Phase.KAFKA_COMMIT, 0.003)
    tx.group(3)
    tx.phase(Phase.PG_COMMIT, 0.004)
    tx.end(Status.COMMITTED, None, None, 0.01)

    span = only_span(exporter)
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == outer.get_span_context().trace_id
    assert dict(span.attributes or {}) == {
        "pk2pc.name": "orders", "pk2pc.instance": "i1", "pk2pc.txid": "a" * 32,
        "pk2pc.idempotency_key.present": True, "pk2pc.gid": GID,
        "pk2pc.group.members": 3, "pk2pc.status": "committed"}
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("pk2pc.begin", {"pk2pc.phase": "begin", "pk2pc.phase.duration_s": 0.001}),
        ("pk2pc.prepare", {"pk2pc.phase": "prepare", "pk2pc.phase.duration_s": 0.002}),
        ("pk2pc.kafka_commit", {"pk2pc.phase": "kafka_commit",
                                "pk2pc.phase.duration_s": 0.003}),
        ("pk2pc.pg_commit", {"pk2pc.phase": "pg_commit", "pk2pc.phase.duration_s": 0.004})]
    assert span.status.status_code is StatusCode.UNSET  # OK is the application's to set
    assert not span.links


def test_no_current_span_makes_a_root_span(observer: TracingObserver,
                                           exporter: InMemorySpanExporter) -> None:
    observer.transaction(info()).end(Status.COMMITTED, None, None, 0.0)
    span = only_span(exporter)
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["pk2pc.idempotency_key.present"] is False


def test_headers_carry_the_spans_context(observer: TracingObserver,
                                         exporter: InMemorySpanExporter) -> None:
    tx = observer.transaction(info())
    headers = dict(tx.headers())
    assert tx.headers() == tx.headers()
    tx.end(Status.COMMITTED, None, None, 0.0)
    assert list(headers) == ["traceparent"]
    assert ids(headers["traceparent"]) == ids(traceparent(only_span(exporter)))


def test_tracestate_goes_along(observer: TracingObserver, provider: TracerProvider) -> None:
    upstream = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "vendor=opaque"}
    parent = TraceContextTextMapPropagator().extract(upstream)
    token = otel_context.attach(parent)
    try:
        tx = observer.transaction(info())
    finally:
        otel_context.detach(token)
    headers = dict(tx.headers())
    tx.end(Status.COMMITTED, None, None, 0.0)
    assert headers["tracestate"] == b"vendor=opaque"
    assert headers["traceparent"].startswith(b"00-0af7651916cd43dd8448eb211c80319c-")


def test_the_global_propagator_by_default(provider: TracerProvider,
                                          exporter: InMemorySpanExporter) -> None:
    tx = TracingObserver(tracer_provider=provider).transaction(info())
    headers = dict(tx.headers())
    tx.end(Status.COMMITTED, None, None, 0.0)
    assert ids(headers["traceparent"]) == ids(traceparent(only_span(exporter)))


@pytest.mark.parametrize(("status", "error", "phase"), [
    (Status.ROLLED_BACK, RolledBack("Kafka refused", phase=Phase.KAFKA_COMMIT),
     Phase.KAFKA_COMMIT),
    (Status.IN_DOUBT, OutcomeUnknown("commit timed out", gid=GID, phase=Phase.KAFKA_COMMIT),
     Phase.KAFKA_COMMIT),
    (Status.ROLLED_BACK, ValueError("the block raised"), Phase.EXECUTE),
])
def test_not_committed_is_an_error(observer: TracingObserver, exporter: InMemorySpanExporter,
                                   status: Status, error: BaseException, phase: Phase) -> None:
    tx = observer.transaction(info())
    tx.end(status, phase, error, 0.5)
    tx.end(Status.COMMITTED, None, None, 0.5)  # a second end changes nothing
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    message = getattr(error, "message", str(error))
    assert span.status.description == f"{status.value}: " + (
        message if isinstance(error, Error) else f"{type(error).__name__}: {message}")
    assert span.attributes is not None
    assert span.attributes["pk2pc.status"] == status.value
    assert span.attributes["pk2pc.failed_phase"] == phase.value
    qualified = ("ValueError" if isinstance(error, ValueError)
                 else f"coordinator.errors.{type(error).__name__}")
    assert span.attributes["error.type"] == qualified
    [event] = [e for e in span.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == qualified


def test_an_idempotency_hit_is_not_an_error(observer: TracingObserver,
                                            exporter: InMemorySpanExporter) -> None:
    tx = observer.transaction(info(key="order-42"))
    tx.end(Status.ROLLED_BACK, Phase.BEGIN, AlreadyCommitted(
        "already committed", idempotency_key="order-42", previous_gid=GID), 0.1)
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["pk2pc.idempotency_key.already_committed"] is True
    assert span.attributes["pk2pc.status"] == "rolled_back"


def test_consumed_messages_become_links(observer: TracingObserver,
                                        provider: TracerProvider,
                                        exporter: InMemorySpanExporter) -> None:
    tracer = provider.get_tracer("test")
    a, b = tracer.start_span("producer a"), tracer.start_span("producer b")
    a.end()
    b.end()
    consumed = (
        (("traceparent", traceparent(a)),),
        (("other", b"x"), ("TraceParent", traceparent(b))),  # names compared without case
        (("traceparent", traceparent(a)),),                  # the same context: one link
        (),                                                  # no headers
        (("traceparent", b"not a traceparent"),),            # ignored
    )
    outer = tracer.start_span("consume loop")
    with trace.use_span(outer, end_on_exit=True):
        tx = observer.transaction(info(consumed=consumed))
    tx.end(Status.COMMITTED, None, None, 0.0)
    span = only_span(exporter)
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (a.get_span_context().trace_id, a.get_span_context().span_id),
        (b.get_span_context().trace_id, b.get_span_context().span_id)]
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["pk2pc.consumed.messages"] == 5


def test_observer_calls_from_other_threads_leave_contexts_alone(
        observer: TracingObserver, provider: TracerProvider,
        exporter: InMemorySpanExporter) -> None:
    """Started on the caller's thread, told the rest on another: the span's parent is
    the caller's span, and no thread's current context is changed."""
    outer = provider.get_tracer("test").start_span("request")
    with trace.use_span(outer, end_on_exit=True):
        tx = observer.transaction(info())
        assert trace.get_current_span() is outer
    seen: list[trace.Span] = []

    def worker() -> None:
        tx.headers()
        tx.phase(Phase.PREPARE, 0.1)
        tx.end(Status.COMMITTED, None, None, 0.2)
        seen.append(trace.get_current_span())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [trace.INVALID_SPAN]
    assert trace.get_current_span() is trace.INVALID_SPAN
    span = only_span(exporter)
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id


def test_in_a_task_the_parent_is_the_tasks_span(observer: TracingObserver,
                                                provider: TracerProvider,
                                                exporter: InMemorySpanExporter) -> None:
    """asyncio: the span current in the task entering the transaction is its parent,
    even while another task has a different current span."""
    tracer = provider.get_tracer("test")

    async def request(name: str) -> tuple[int, TransactionObserver]:
        with tracer.start_as_current_span(name) as outer:
            await asyncio.sleep(0)
            tx = observer.transaction(info())
            await asyncio.sleep(0)
            return outer.get_span_context().span_id, tx

    async def main() -> list[tuple[int, TransactionObserver]]:
        done = await asyncio.gather(request("a"), request("b"))
        for _, tx in done:  # ended from worker threads, as the asyncio driver may
            await asyncio.to_thread(tx.end, Status.COMMITTED, None, None, 0.0)
        return list(done)

    done = asyncio.run(main())
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()
             if s.name == SPAN_NAME and s.context is not None}
    parents = sorted(s.parent.span_id for s in spans.values() if s.parent is not None)
    assert parents == sorted(outer_id for outer_id, _ in done)


@pytest.mark.parametrize(("error_gid", "expected"), [(GID, GID), ("(txid " + "a" * 32 + ")", None)])
def test_a_gid_chosen_before_a_failed_prepare_is_reported(
        observer: TracingObserver, exporter: InMemorySpanExporter, error_gid: str,
        expected: str | None) -> None:
    tx = observer.transaction(info())
    tx.end(Status.ROLLED_BACK, Phase.PREPARE,
           RolledBack("connection lost at PREPARE", gid=error_gid, phase=Phase.PREPARE), 0.1)
    span = only_span(exporter)
    assert (span.attributes or {}).get("pk2pc.gid") == expected
