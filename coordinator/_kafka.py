"""Thin adapter over confluent-kafka's transactional producer: one Kafka transaction.

:func:`run_transaction` runs one Kafka transaction (business messages plus
decision records) on a producer slot (``_producers.py``), with the session a
transaction took before its PREPARE, and reports a :class:`KafkaResult`; it
never raises for Kafka errors, so the protocol decides what follows from the
outcome alone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from ._enums import Phase
from ._errmap import describe, kafka_error_kind, kafka_error_of
from ._logging import log_extra
from ._producers import ProducerSlot
from ._protocol import CommitAction, KafkaErrorKind, KafkaOutcome, commit_action
from .config import RetryPolicy
from .decision_log import DecisionRecord

__all__ = ["ConsumedOffsets", "KafkaResult", "StagedMessage", "merge_offsets", "run_transaction"]

log = logging.getLogger("coordinator.kafka")

P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class StagedMessage:
    """A message produced inside a block, held until PostgreSQL has prepared."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class ConsumedOffsets:
    """Where a consumer's group should resume once the transaction commits: the
    offsets (last consumed + 1 per partition), committed inside the Kafka
    transaction with the consumer's group metadata (KIP-447: a consumer that lost
    its partitions in a rebalance is fenced by the group generation)."""

    consumer_id: int
    """Identifies the consumer (offsets of one consumer are merged in a group commit)."""
    group_metadata: Any
    offsets: tuple[tuple[str, int, int], ...]
    """(topic, partition, next offset)."""


def merge_offsets(items: Sequence[ConsumedOffsets]) -> list[ConsumedOffsets]:
    """One entry per consumer, with the highest offset per partition (members of a
    group commit may carry consecutive batches of the same consumer)."""
    merged: dict[int, tuple[Any, dict[tuple[str, int], int]]] = {}
    for item in items:
        _, best = merged.setdefault(item.consumer_id, (item.group_metadata, {}))
        for topic, partition, offset in item.offsets:
            if offset > best.get((topic, partition), -1):
                best[(topic, partition)] = offset
    return [ConsumedOffsets(cid, meta, tuple((t, p, o) for (t, p), o in sorted(best.items())))
            for cid, (meta, best) in merged.items()]


@dataclass(slots=True)
class KafkaResult:
    outcome: KafkaOutcome
    error: BaseException | None = None
    detail: str = ""
    commit_seconds: float = 0.0
    members: int = 1
    """How many coordinated transactions the Kafka transaction carried (group commit)."""


_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class _Deliveries:
    """Counts delivery reports of one transaction and keeps the first error
    (the first real one: messages purged because of it are a consequence),
    and the highest offset a decision record was written at."""

    def __init__(self, decision_topic: str) -> None:
        self.pending = 0
        self.error: KafkaError | None = None
        self.decision_topic = decision_topic
        self.last_decision = -1

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        self.pending -= 1
        if err is not None and (self.error is None or (
                self.error.code() in _PURGED and err.code() not in _PURGED)):
            self.error = err
        if err is None and msg.topic() == self.decision_topic:
            offset = msg.offset()
            if offset is not None and offset > self.last_decision:
                self.last_decision = offset


def _discard_on_escape(
    fn: Callable[Concatenate[ProducerSlot, P], KafkaResult],
) -> Callable[Concatenate[ProducerSlot, P], KafkaResult]:
    """Kafka errors become a :class:`KafkaResult`; anything else escaping (an
    interrupt, a bug) may leave the producer with an open transaction, so the
    producer is discarded: the next ``init_transactions()`` aborts what is left."""

    @functools.wraps(fn)
    def wrapper(slot: ProducerSlot, /, *args: P.args, **kwargs: P.kwargs) -> KafkaResult:
        try:
            return fn(slot, *args, **kwargs)
        except BaseException:
            slot.discard()
            raise

    return wrapper


@_discard_on_escape
def run_transaction(
    slot: ProducerSlot,
    messages: Sequence[StagedMessage],
    decisions: Sequence[DecisionRecord],
    decision_topic: str,
    commit_retry: RetryPolicy,
    timeout: float,
    log_id: str,
    *,
    generation: int,
    consumed: Sequence[ConsumedOffsets] = (),
) -> KafkaResult:
    """Produce ``messages`` and ``decisions`` in one Kafka transaction, add the
    ``consumed`` offsets to it, and commit it, with the slot's session
    ``generation`` only (the one taken before PREPARE)."""
    with slot.lock:
        producer = slot.producer_of(generation)
        if producer is None:
            return KafkaResult(
                KafkaOutcome.FAILED_BEFORE_COMMIT, None,
                f"the producer session taken before PREPARE (generation {generation}) was "
                f"replaced (now {slot.generation}); only that session may commit")
        return _run(slot, producer, messages, decisions, decision_topic, commit_retry,
                    timeout, log_id, consumed)


def _run(
    slot: ProducerSlot,
    producer: Producer,
    messages: Sequence[StagedMessage],
    decisions: Sequence[DecisionRecord],
    decision_topic: str,
    commit_retry: RetryPolicy,
    timeout: float,
    log_id: str,
    consumed: Sequence[ConsumedOffsets],
) -> KafkaResult:
    deliveries = _Deliveries(decision_topic)
    try:
        producer.begin_transaction()
        for m in messages:
            _produce(producer, deliveries, m.topic, m.value, m.key, list(m.headers), m.partition)
        for d in decisions:
            _produce(producer, deliveries, decision_topic, d.value(), d.key(), d.headers(),
                     slot.decision_partition)
        remaining = producer.flush(timeout)
        slot.advance_floor(deliveries.last_decision + 1)
        if remaining > 0:
            raise _BeforeCommit(f"{remaining} message(s) not delivered within {timeout}s")
        if deliveries.error is not None:
            raise _BeforeCommit(f"delivery failed: {deliveries.error.name()}: "
                                f"{deliveries.error.str()}", KafkaException(deliveries.error))
        for item in merge_offsets(consumed):
            # A consumer fenced by a rebalance (stale group generation) fails here or
            # at the commit: either way its transaction cannot commit.
            producer.send_offsets_to_transaction(
                [TopicPartition(t, p, o) for t, p, o in item.offsets], item.group_metadata,
                timeout)
    except Exception as exc:
        # commit_transaction() was never called, so the transaction cannot commit:
        # abort it, whatever failed.
        cause, detail = _before_commit_cause(exc)
        _abort(slot, producer, timeout, log_id)
        return KafkaResult(KafkaOutcome.FAILED_BEFORE_COMMIT, cause, detail)

    started = time.monotonic()
    # The retry policy decides when to stop; the protocol decides what is retried.
    retrying = commit_retry.retrying(
        lambda e: commit_action(_kind_of(e), retries_left=True) is CommitAction.RETRY)
    attempts = 0
    try:
        for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                if attempts > 1:
                    log.warning("gid=%s retrying Kafka commit (attempt %d)", log_id, attempts,
                                extra=_extra(slot, log_id))
                producer.commit_transaction(timeout)
    except Exception as exc:
        kind = _kind_of(exc)
        assert commit_action(kind, retries_left=False) is CommitAction.LEAVE_IN_DOUBT
        elapsed = time.monotonic() - started
        log.warning("gid=%s Kafka commit failed after %d attempt(s): %s", log_id, attempts,
                    describe(exc), extra=_extra(slot, log_id))
        # Replace the producer: its new epoch fences whatever of this transaction is
        # still in flight (librdkafka has no KIP-890 protection against a late
        # request landing in the next transaction of the same epoch).
        slot.discard()
        return KafkaResult(KafkaOutcome.UNKNOWN, exc, f"{kind.value}: {describe(exc)}", elapsed)
    # The commit succeeded, so every message was delivered; check the reports anyway.
    if deliveries.error is not None or deliveries.pending != 0:
        log.error("gid=%s Kafka commit succeeded but delivery reports disagree "
                  "(pending=%d, error=%s)", log_id, deliveries.pending, deliveries.error,
                  extra=_extra(slot, log_id))
    return KafkaResult(KafkaOutcome.COMMITTED, commit_seconds=time.monotonic() - started)


def _extra(slot: ProducerSlot, log_id: str) -> dict[str, object]:
    """Log fields: ``log_id`` is a gid, or a group's first gid and its size."""
    return log_extra(gid=log_id.split(" ", 1)[0], phase=Phase.KAFKA_COMMIT,
                     transactional_id=slot.transactional_id)


def _kind_of(exc: BaseException) -> KafkaErrorKind:
    err = kafka_error_of(exc)
    return kafka_error_kind(err) if err is not None else KafkaErrorKind.OTHER


def _before_commit_cause(exc: Exception) -> tuple[BaseException | None, str]:
    """The cause and a log line for a failure before ``commit_transaction()``."""
    if isinstance(exc, _BeforeCommit):
        return exc.cause, str(exc)
    if isinstance(exc, KafkaException | BufferError):
        return exc, describe(exc)
    # confluent-kafka raises other exceptions too: when the producer is fenced (a
    # recovery worker's init_transactions()) while delivery reports are pending,
    # flush() raises SystemError ("<callback> returned a result with an exception
    # set"), chained to the fatal KafkaException.
    kafka_cause = _kafka_cause(exc)
    if kafka_cause is not None:
        return kafka_cause, f"{describe(kafka_cause)} (raised as {type(exc).__name__})"
    return exc, describe(exc)


def _kafka_cause(exc: BaseException) -> KafkaException | None:
    """The KafkaException an exception was raised from (directly or via its context)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        seen = seen.__cause__ or seen.__context__
        if isinstance(seen, KafkaException):
            return seen
    return None


class _BeforeCommit(Exception):
    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def _produce(
    producer: Producer, deliveries: _Deliveries, topic: str, value: bytes | None,
    key: bytes | None, headers: list[tuple[str, bytes]], partition: int | None,
) -> None:
    kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": deliveries}
    if headers:
        kwargs["headers"] = headers
    if partition is not None:
        kwargs["partition"] = partition
    while True:
        try:
            producer.produce(topic, **kwargs)
            deliveries.pending += 1
            return
        except BufferError:
            producer.poll(0.05)  # local queue full: serve delivery reports, retry


def _abort(slot: ProducerSlot, producer: Producer, timeout: float, log_id: str) -> None:
    """Abort the open transaction, then discard the producer.

    Either way the transaction can no longer commit: commit_transaction() was
    never called, and a new producer's
    init_transactions() aborts whatever is left.

    The producer is discarded even when the abort succeeded: after a failed
    transaction (e.g. a batch refused with MSG_SIZE_TOO_LARGE) librdkafka's
    idempotence state can need an epoch bump that it only performs inside the
    *next* transaction, failing that innocent transaction with
    OUT_OF_ORDER_SEQUENCE_NUMBER / _PURGE_QUEUE. A fresh producer starts clean.
    """
    try:
        producer.abort_transaction(timeout)
    except Exception as exc:
        log.warning("gid=%s Kafka abort failed (%s); re-creating the producer", log_id,
                    describe(exc), extra=_extra(slot, log_id))
    slot.discard()
