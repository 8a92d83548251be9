"""TracingObserver when the sampler drops the transaction's span: the span is not
recording, so the observer skips its attributes and events, but the produced
messages must still carry its context (not sampled), so that consumers do not start
a sampled trace of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coordinator import OutcomeUnknown, Phase, Status
from coordinator.observe import TransactionInfo
from coordinator.tracing import TracingObserver

GID = "pk2pc2:orders:i1:0:2:17:0123456789ab:" + "f" * 32


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


@pytest.fixture
def observer(exporter: InMemorySpanExporter) -> Iterator[TracingObserver]:
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield TracingObserver(tracer_provider=provider,
                          propagator=TraceContextTextMapPropagator())
    provider.shutdown()


def info() -> TransactionInfo:
    return TransactionInfo("orders", "i1", "a" * 32)


@pytest.mark.parametrize("ending", ["committed", "in_doubt"])
def test_a_dropped_span_still_propagates_its_context(
        observer: TracingObserver, exporter: InMemorySpanExporter, ending: str) -> None:
    tx = observer.transaction(info())
    tx.phase(Phase.BEGIN, 0.001)
    headers = dict(tx.headers())
    tx.phase(Phase.PREPARE, 0.002)
    tx.prepared(GID)
    tx.phase(Phase.KAFKA_COMMIT, 0.003)
    tx.group(4)
    if ending == "committed":
        tx.phase(Phase.PG_COMMIT, 0.004)
        tx.end(Status.COMMITTED, None, None, 0.01)
    else:
        tx.end(Status.IN_DOUBT, Phase.KAFKA_COMMIT, OutcomeUnknown("lost", gid=GID), 0.01)
    tx.end(Status.COMMITTED, None, None, 0.02)  # a second end is ignored

    assert exporter.get_finished_spans() == ()
    ctx = trace.get_current_span(
        TraceContextTextMapPropagator().extract(
            {k: v.decode() for k, v in headers.items()})).get_span_context()
    assert ctx.is_valid and not ctx.trace_flags.sampled
    _, trace_id, span_id, flags = headers["traceparent"].decode().split("-")
    assert (trace_id, span_id) == (format_trace_id(ctx.trace_id), format_span_id(ctx.span_id))
    assert int(flags, 16) & 0x01 == 0  # not sampled (other flag bits may be set)


def test_a_sampled_parent_still_gets_the_full_span(
        observer: TracingObserver, exporter: InMemorySpanExporter) -> None:
    """ParentBased: under a sampled caller span the transaction's span records."""
    parent = trace.NonRecordingSpan(trace.SpanContext(
        trace_id=0x1234, span_id=0x5678, is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
    token = trace.use_span(parent, end_on_exit=False)
    with token:
        tx = observer.transaction(info())
    tx.phase(Phase.PREPARE, 0.002)
    tx.prepared(GID)
    tx.group(4)
    tx.end(Status.COMMITTED, None, None, 0.01)

    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["pk2pc.gid"] == GID
    assert span.attributes["pk2pc.group.members"] == 4
    assert span.attributes["pk2pc.status"] == "committed"
    assert [e.name for e in span.events] == ["pk2pc.prepare"]
