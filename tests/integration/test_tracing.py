"""TracingObserver against the real stack, with both drivers: a transaction's span
(parent, attributes, phase events, status), the ``traceparent`` a read_committed
consumer sees on its messages, and the consume path's links to the consumed
messages' creation contexts. Spans go to a private TracerProvider kept in memory
(the global provider is never set)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import Message, Producer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coordinator import PrepareForbidden, Status
from coordinator.tracing import SPAN_NAME, TracingObserver
from tests.integration.consume import Out, Sql, Write, open_driver, pipeline

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration

BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator

PHASES = ["pk2pc.begin", "pk2pc.prepare", "pk2pc.kafka_commit", "pk2pc.pg_commit"]


@pytest.fixture
def tracing(provider: TracerProvider) -> TracingObserver:
    return TracingObserver(tracer_provider=provider,
                           propagator=TraceContextTextMapPropagator())


def transaction_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == SPAN_NAME]


def context_of(headers: Sequence[tuple[str, bytes | None]]) -> trace.SpanContext:
    """The span context a message's ``traceparent`` header carries."""
    carrier = {k: (v or b"").decode() for k, v in headers}
    extracted = TraceContextTextMapPropagator().extract(carrier)
    found = trace.get_current_span(extracted).get_span_context()
    assert found.is_valid, headers
    return found


def test_a_committed_transaction_is_traced(env: Env, orders: str, tracing: TracingObserver,
                                           provider: TracerProvider,
                                           exporter: InMemorySpanExporter) -> None:
    topic = env.topic()
    coord = env.coordinator(observers=(tracing,))
    with (provider.get_tracer("test").start_as_current_span("request") as outer,
          coord.transaction(idempotency_key="order-42") as tx):
        tx.execute("INSERT INTO orders (id, total) VALUES (42, 10)")
        tx.produce(topic, value=b"a", key=b"42", headers={"type": "created"})
        tx.produce(topic, value=b"b", key=b"42")
    assert tx.status is Status.COMMITTED

    [span] = transaction_spans(exporter)
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id
    assert span.context is not None and span.context.trace_id == outer.get_span_context().trace_id
    attributes = dict(span.attributes or {})
    assert attributes == {
        "pk2pc.name": env.name, "pk2pc.instance": env.instance, "pk2pc.txid": tx.txid,
        "pk2pc.idempotency_key.present": True, "pk2pc.gid": tx.gid,
        "pk2pc.group.members": 1, "pk2pc.status": "committed"}
    assert [e.name for e in span.events] == PHASES
    assert all(isinstance((e.attributes or {})["pk2pc.phase.duration_s"], float)
               for e in span.events)
    assert span.status.status_code is StatusCode.UNSET

    # Every message a read_committed consumer sees carries the span's context.
    records = env.read(topic)
    assert [r.value for r in records] == [b"a", b"b"]
    assert records[0].headers[0] == ("type", b"created")  # the block's own headers first
    for record in records:
        found = context_of(record.headers)
        assert (found.trace_id, found.span_id) == (span.context.trace_id, span.context.span_id)
    # The decision record is the coordinator's own: no trace context there.
    [decision] = env.decisions().values()
    assert "traceparent" not in dict(decision.headers)


def test_a_rolled_back_transaction_is_an_error(env: Env, orders: str,
                                               tracing: TracingObserver,
                                               provider: TracerProvider,
                                               exporter: InMemorySpanExporter) -> None:
    topic = env.topic()
    coord = env.coordinator(observers=(tracing,))
    with (provider.get_tracer("test").start_as_current_span("request") as outer,
          pytest.raises(RuntimeError), coord.transaction() as tx):
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
        raise RuntimeError("the block failed")
    assert tx.status is Status.ROLLED_BACK

    [span] = transaction_spans(exporter)
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "rolled_back: RuntimeError: the block failed"
    attributes = dict(span.attributes or {})
    assert attributes["pk2pc.status"] == "rolled_back"
    assert attributes["pk2pc.failed_phase"] == "execute"
    assert attributes["error.type"] == "RuntimeError"
    assert "pk2pc.gid" not in attributes  # never prepared
    [exception] = [e for e in span.events if e.name == "exception"]
    assert (exception.attributes or {})["exception.message"] == "the block failed"
    assert env.read(topic) == [] and env.ids() == []


def test_a_failed_prepare_is_an_error(env: Env, orders: str, tracing: TracingObserver,
                                      exporter: InMemorySpanExporter) -> None:
    topic = env.topic()
    coord = env.coordinator(observers=(tracing,))
    with pytest.raises(PrepareForbidden), coord.transaction() as tx:
        tx.execute("CREATE TEMPORARY TABLE scratch (x int)")
        tx.produce(topic, value=b"never")
    [span] = transaction_spans(exporter)
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["pk2pc.status"] == "rolled_back"
    assert attributes["pk2pc.failed_phase"] == "prepare"
    assert attributes["error.type"] == "coordinator.errors.PrepareForbidden"
    assert attributes["pk2pc.gid"] == tx.gid  # chosen before PREPARE, reported with it
    assert [e.name for e in span.events if e.name != "exception"] == ["pk2pc.begin",
                                                                      "pk2pc.prepare"]


def test_the_consume_path_links_to_the_consumed_messages(
        env: Env, tracing: TracingObserver, provider: TracerProvider,
        exporter: InMemorySpanExporter) -> None:
    p = pipeline(env, partitions=1)
    tracer = provider.get_tracer("upstream")
    upstream: dict[str, trace.SpanContext] = {}
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for i in range(6):
        key = f"m-{i}"
        with tracer.start_as_current_span(f"publish {key}") as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
        upstream[key] = span.get_span_context()
        producer.produce(p.source, key=key, value=key.encode(),
                         headers=[(k, v.encode()) for k, v in carrier.items()])
    assert producer.flush(30) == 0

    def plan(messages: Sequence[Message]) -> list[Write]:
        writes: list[Write] = []
        for m in messages:
            key = (m.key() or b"").decode()
            writes += [Sql("INSERT INTO invoices (msg_key, src) VALUES (%s, %s)",
                           (key, str(m.offset()))),
                       Out(p.sink, key, b"paid " + key.encode())]
        return writes

    consumer = p.consumer()
    try:
        with open_driver(env.driver, env, observers=(tracing,)) as d:
            d.run_consumer(consumer, plan, lambda: sum(p.rows().values()) >= 6,
                           batch_size=3, batch_timeout=0.2)
    finally:
        consumer.close()
    p.assert_exactly_once(list(upstream))

    spans = [s for s in transaction_spans(exporter)
             if (s.attributes or {}).get("pk2pc.status") == "committed"]
    linked = {(link.context.trace_id, link.context.span_id): span
              for span in spans for link in span.links}
    assert set(linked) == {(c.trace_id, c.span_id) for c in upstream.values()}
    assert all(span.parent is None for span in spans)  # links, not a parent: a new trace
    assert sum((s.attributes or {})["pk2pc.consumed.messages"] for s in spans) == 6  # type: ignore[misc]
    # Each output message carries the context of the transaction that consumed its input.
    for record in env.read(p.sink):
        key = (record.key or b"").decode()
        found = context_of(record.headers)
        consumed_by = linked[(upstream[key].trace_id, upstream[key].span_id)].context
        assert consumed_by is not None
        assert (found.trace_id, found.span_id) == (consumed_by.trace_id, consumed_by.span_id)
        assert found.trace_id != upstream[key].trace_id


def test_a_no_op_provider_adds_no_header(env: Env) -> None:
    """With the API's no-op provider (no SDK configured) messages get no header."""
    topic = env.topic()
    coord = env.coordinator(observers=(TracingObserver(
        tracer_provider=trace.NoOpTracerProvider()),))
    with coord.transaction() as tx:
        tx.produce(topic, value=b"x", key=uuid.uuid4().hex)
    assert tx.status is Status.COMMITTED
    [record] = env.read(topic)
    assert record.headers == ()


def test_log_records_carry_the_fields(env: Env, orders: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Each record a real transaction emits has gid, phase, pk2pc_name and instance."""
    caplog.set_level(logging.DEBUG, logger="coordinator")
    topic = env.topic()
    coord = env.coordinator()
    with coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (7, 7)")
        tx.produce(topic, value=b"x")
    assert tx.status is Status.COMMITTED
    ours = [r for r in caplog.records if r.name.startswith("coordinator")]
    fields = [tuple(r.__dict__[f] for f in ("gid", "phase", "pk2pc_name", "instance"))
              for r in ours]
    assert (None, "startup", env.name, env.instance) in fields  # the coordinator is ready
    assert (tx.gid, "prepare", env.name, env.instance) in fields
    assert (tx.gid, "pg_commit", env.name, env.instance) in fields
