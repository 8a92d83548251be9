"""OpenTelemetry traces of coordinated transactions (the ``[otel]`` extra).

:class:`TracingObserver` is an :class:`~coordinator.observe.Observer`: give it
to the coordinator with ``CoordinatorConfig(observers=(TracingObserver(),))``.
Each coordinated transaction gets one span, ``pk2pc.transaction``:

* its parent is the span current where the transaction was entered (``with
  coord.transaction()`` / ``async with``), e.g. a web request's span;
* in the consume path it links to the creation context (``traceparent``) of
  every consumed message it commits the offsets of, as the OpenTelemetry
  messaging conventions ask of a span that processes a batch;
* every message it produces carries its context (W3C ``traceparent``, and
  ``tracestate`` or ``baggage`` when the propagator adds them), so consumers
  continue the trace;
* attributes say which transaction it is (name, instance, txid, gid once
  prepared, whether it had an idempotency key, the size of the Kafka group it
  committed in) and how it ended; one event per phase carries the phase's
  duration; a transaction that did not commit has status ERROR with its
  exception recorded.

A span the sampler drops is not recording: its context is still written into
the produced messages (so that consumers do not sample it either), and nothing
else is done for it (no attribute or event is built only to be discarded).

The span is *not* made the current span: observers may run on other threads
or tasks than the one that entered the transaction, so the observer never
attaches a context; it passes its own explicitly (as parent, and to the
propagator). Spans the block itself starts therefore have the caller's span as
parent, beside ``pk2pc.transaction``.

Only this module of the library imports OpenTelemetry.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, TracerProvider

from ._enums import Phase, Status
from .errors import AlreadyCommitted, Error
from .gid import InvalidGid, parse
from .observe import Headers, TransactionInfo

__all__ = ["SPAN_NAME", "TracingObserver"]

SPAN_NAME = "pk2pc.transaction"
"""The name of every transaction's span."""

_SCOPE = "pg-kafka-2pc"


def _version() -> str | None:
    try:
        return importlib.metadata.version(_SCOPE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return None


class TracingObserver:
    """Traces each coordinated transaction with one OpenTelemetry span.

    ``tracer_provider``: where the spans go (``None``: the global provider, as
    set by ``opentelemetry.trace.set_tracer_provider``, looked up when a
    transaction starts). ``propagator``: how the span's context is written into
    produced messages' headers and read from consumed ones (``None``: the
    global propagator, ``opentelemetry.propagate``, by default W3C trace
    context and baggage).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None,
                 propagator: TextMapPropagator | None = None) -> None:
        self._tracer = trace.get_tracer(_SCOPE, _version(), tracer_provider=tracer_provider)
        self._propagator = propagator

    def propagator(self) -> TextMapPropagator:
        """The propagator in use (the global one unless one was given)."""
        return self._propagator or propagate.get_global_textmap()

    def transaction(self, info: TransactionInfo) -> _TransactionSpan:
        # Called on the thread (or in the task) entering the transaction: the
        # caller's context is current here, and only here.
        parent = otel_context.get_current()
        propagator = self.propagator()
        attributes: dict[str, str | bool | int] = {
            "pk2pc.name": info.name,
            "pk2pc.instance": info.instance,
            "pk2pc.txid": info.txid,
            "pk2pc.idempotency_key.present": info.idempotency_key is not None,
        }
        if info.consumed_headers:
            attributes["pk2pc.consumed.messages"] = len(info.consumed_headers)
        span = self._tracer.start_span(
            SPAN_NAME, context=parent, kind=SpanKind.PRODUCER, attributes=attributes,
            links=_creation_links(info.consumed_headers, propagator),
            record_exception=False, set_status_on_exception=False)
        return _TransactionSpan(span, trace.set_span_in_context(span, parent), propagator)

    def producer_started(self, name: str, instance: str, slot: int, generation: int) -> None:
        """Not traced (no transaction's span to attach it to)."""

    def idempotency_hit(self, name: str, instance: str) -> None:
        """Not traced here: the transaction's own span ends with it."""


class _TransactionSpan:
    """The span of one transaction (a :class:`~coordinator.observe.TransactionObserver`)."""

    __slots__ = ("_context", "_ended", "_gid", "_headers", "_lock", "_propagator",
                 "_recording", "span")

    def __init__(self, span: Span, context: otel_context.Context,
                 propagator: TextMapPropagator) -> None:
        self.span = span
        self._context = context
        self._propagator = propagator
        self._headers: tuple[tuple[str, bytes], ...] | None = None
        self._ended = False
        self._gid = False
        self._lock = threading.Lock()
        self._recording = span.is_recording()

    def headers(self) -> Headers:
        if self._headers is None:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._context)
            self._headers = tuple((k, v.encode()) for k, v in carrier.items())
        return self._headers

    def phase(self, phase: Phase, seconds: float) -> None:
        if not self._recording:
            return
        self.span.add_event(f"pk2pc.{phase.value}", {
            "pk2pc.phase": phase.value, "pk2pc.phase.duration_s": seconds})

    def prepared(self, gid: str) -> None:
        self._gid = True
        if self._recording:
            self.span.set_attribute("pk2pc.gid", gid)

    def group(self, members: int) -> None:
        if self._recording:
            self.span.set_attribute("pk2pc.group.members", members)

    def end(self, status: Status, phase: Phase | None, error: BaseException | None,
            seconds: float) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        span = self.span
        if not self._recording:
            span.end()
            return
        if not self._gid and isinstance(error, Error) and _is_gid(error.gid):
            # Chosen, then PREPARE failed: the gid may still be in doubt somewhere.
            span.set_attribute("pk2pc.gid", str(error.gid))
        span.set_attribute("pk2pc.status", status.value)
        if status is not Status.COMMITTED:
            if phase is not None:
                span.set_attribute("pk2pc.failed_phase", phase.value)
            if isinstance(error, AlreadyCommitted):
                # A retry of a request that already committed: the expected answer
                # to a retry, not a failure (the status attribute says rolled_back).
                span.set_attribute("pk2pc.idempotency_key.already_committed", True)
            else:
                if error is not None:
                    span.set_attribute("error.type", _type_name(error))
                    span.record_exception(error)
                span.set_status(StatusCode.ERROR, _description(status, error))
        span.end()


def _is_gid(text: str | None) -> bool:
    if text is None:
        return False
    try:
        parse(text)
    except InvalidGid:
        return False
    return True


def _type_name(error: BaseException) -> str:
    """The exception's class, qualified by its module (builtins unqualified)."""
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _description(status: Status, error: BaseException | None) -> str:
    if isinstance(error, Error):
        return f"{status.value}: {error.message}"
    if error is not None:
        return f"{status.value}: {type(error).__name__}: {error}"
    return status.value


class _HeadersGetter(Getter[Sequence[tuple[str, bytes]]]):
    """Reads a propagator's fields from Kafka headers (names compared without
    case, as HTTP header names are; values decoded as UTF-8)."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        key = key.lower()
        found = [v.decode("utf-8", "replace") for k, v in carrier
                 if k.lower() == key and v is not None]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeadersGetter()


def _creation_links(consumed_headers: Sequence[Headers],
                   propagator: TextMapPropagator | None = None) -> list[Link]:
    """One link per distinct valid creation context found in the consumed
    messages' headers, in order of first appearance."""
    propagator = propagator or propagate.get_global_textmap()
    links: list[Link] = []
    seen: set[tuple[int, int]] = set()
    for headers in consumed_headers:
        if not headers:
            continue
        extracted = propagator.extract(headers, context=otel_context.Context(),
                                       getter=_GETTER)
        found = trace.get_current_span(extracted).get_span_context()
        if found.is_valid and (found.trace_id, found.span_id) not in seen:
            seen.add((found.trace_id, found.span_id))
            links.append(Link(found))
    return links
