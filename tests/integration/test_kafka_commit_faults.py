"""Errors of ``commit_transaction()`` with the real services around them.

The producer of the (single) slot is wrapped so that ``commit_transaction()``
raises a real ``KafkaError`` of each kind instead of (or before) committing;
everything else -- begin, produce, abort, PostgreSQL -- is real.

- retriable: the same commit is retried and succeeds;
- retriable until the retries are spent, fatal, fenced, abortable: the outcome is unknown,
  PostgreSQL stays prepared for recovery (status IN_DOUBT);
- abortable: unknown as well -- librdkafka may have sent the EndTxn more than once
  within the call, and an earlier one may have committed (tested with an abortable
  error raised after a real commit): recovery decides from the decision log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import tenacity
from confluent_kafka import KafkaError, KafkaException, Producer

from coordinator import (
    Coordinator,
    GroupCommit,
    OutcomeUnknown,
    Phase,
    RetryPolicy,
    Status,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


class FaultyProducer:
    """Delegates to a real producer; ``commit_transaction`` first raises the queued errors."""

    def __init__(self, real: Producer, errors: list[KafkaError]) -> None:
        self._real = real
        self.errors = errors
        self.errors_after_commit: list[KafkaError] = []
        self.commit_calls = 0

    def commit_transaction(self, *args: Any) -> None:
        self.commit_calls += 1
        if self.errors:
            raise KafkaException(self.errors.pop(0))
        self._real.commit_transaction(*args)
        if self.errors_after_commit:
            raise KafkaException(self.errors_after_commit.pop(0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def faulty(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> Iterator[tuple[Coordinator, list[KafkaError], list[Any]]]:
    errors: list[KafkaError] = []
    wrappers: list[Any] = []

    def factory(conf: dict[str, Any]) -> Any:
        producer = FaultyProducer(Producer(conf), errors)
        wrappers.append(producer)
        return producer

    coord = env.coordinator(
        group_commit=group_commit,
        producers=1,
        kafka_commit_retry=RetryPolicy(stop=tenacity.stop_after_attempt(3),
                                       wait=tenacity.wait_none()),
        producer_factory=factory,
    )
    yield coord, errors, wrappers


def run_order(coord: Coordinator, topic: str, order_id: int) -> Any:
    tx = coord.transaction(idempotency_key=f"order-{order_id}")
    with tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (%s, 1)", (order_id,))
        tx.produce(topic, value=f"order {order_id}")
    return tx


def test_retriable_commit_error_is_retried(env: Env, faulty: Any) -> None:
    coord, errors, wrappers = faulty
    topic = env.topic()
    errors.extend([KafkaError(KafkaError._TIMED_OUT, "injected time-out", retriable=True)] * 2)
    tx = run_order(coord, topic, 1)
    assert tx.status is Status.COMMITTED
    assert wrappers[-1].commit_calls == 3
    assert env.ids() == [1] and env.prepared() == []
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    env.assert_decided(tx.gid)


def test_abortable_error_after_the_broker_committed_is_not_taken_for_an_abort(
        env: Env, faulty: Any) -> None:
    """The EndTxn landed, its answer was lost, librdkafka's re-send got an abortable
    error: the transaction IS committed in Kafka. The coordinator must not roll
    PostgreSQL back; recovery finds the decision and commits."""
    import recovery

    coord, _, wrappers = faulty
    topic = env.topic()
    wrappers[0].errors_after_commit.append(
        KafkaError(KafkaError.INVALID_PRODUCER_ID_MAPPING, "injected after the commit",
                   txn_requires_abort=True))
    tx = coord.transaction(idempotency_key="order-1")
    with pytest.raises(OutcomeUnknown), tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"order 1")
    assert tx.status is Status.IN_DOUBT and env.prepared() == [tx.gid]
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    report = recovery.recover(env.dsn, env.kafka, env.name,
                              recovery.RecoveryConfig(grace_seconds=0))
    assert report.committed == [tx.gid]
    assert env.ids() == [1]


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError._FENCED, "injected fenced", fatal=True),
        KafkaError(KafkaError.INVALID_TXN_STATE, "injected fatal", fatal=True),
        KafkaError(KafkaError._TIMED_OUT, "injected time-out", retriable=True),
        KafkaError(KafkaError._STATE, "injected abortable", txn_requires_abort=True),
    ],
    ids=["fenced", "fatal", "retries-spent", "abortable"],
)
def test_unknown_outcome_leaves_postgres_prepared(
    env: Env, faulty: Any, error: KafkaError
) -> None:
    coord, errors, wrappers = faulty
    topic = env.topic()
    errors.extend([error] * (5 if error.retriable() else 1))
    tx = coord.transaction(idempotency_key="order-1")
    with pytest.raises(OutcomeUnknown) as info, tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"order 1")
    err = info.value
    assert err.gid is not None and err.gid == tx.gid
    assert err.phase is Phase.KAFKA_COMMIT
    assert "unknown" in str(err)
    assert tx.status is Status.IN_DOUBT
    if error.retriable():
        assert wrappers[0].commit_calls == 3  # the policy's three attempts
    # PostgreSQL is left prepared for recovery.
    assert env.prepared() == [err.gid]
    assert env.ids() == []
    errors.clear()
    # The producer was replaced; the next transaction's init_transactions() fences the
    # old one and aborts its open transaction (here: the commit never reached Kafka).
    tx2 = run_order(coord, topic, 2)
    assert tx2.status is Status.COMMITTED
    assert len(wrappers) == 2
    assert [m.value for m in env.read(topic)] == [b"order 2"]
    decisions = env.decisions()
    assert set(decisions) == {tx2.gid}  # no decision for the in-doubt gid: recovery aborts it
    assert env.ids() == [2]
    assert env.prepared() == [err.gid]
