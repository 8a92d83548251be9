"""``run_transaction`` when the client raises something other than a KafkaException
before the commit (found by the fault campaign; see
``tests/integration/test_fenced_live_coordinator.py`` for the real case).

confluent-kafka's ``flush()`` raised ``SystemError`` chained to the fatal ``_FENCED``
KafkaException. Before ``commit_transaction()`` nothing can commit, so the outcome is
FAILED_BEFORE_COMMIT (the coordinator rolls PostgreSQL back), the Kafka error is kept as
the cause, and the producer is discarded.
"""

from __future__ import annotations

from typing import Any

import tenacity
from confluent_kafka import KafkaError, KafkaException

from coordinator._kafka import StagedMessage, run_transaction
from coordinator._producers import ProducerSlot
from coordinator._protocol import KafkaOutcome
from coordinator.config import RetryPolicy
from coordinator.decision_log import DecisionRecord
from tests.fakes import FakeKafka, FakeProducer


def _system_error_from_fenced() -> SystemError:
    fenced = KafkaException(KafkaError(KafkaError._FENCED, "fenced by a newer instance",
                                       fatal=True))
    try:
        try:
            raise fenced
        except KafkaException as exc:
            raise SystemError("<function _Deliveries.__call__> returned a result with an "
                              "exception set") from exc
    except SystemError as err:
        return err


def _run(exc: BaseException) -> tuple[ProducerSlot, FakeProducer, Any]:
    kafka = FakeKafka(script=[{"flush_error": exc}])
    slot = ProducerSlot(0, "pk2pc.t:i:0", 0, {}, 1.0, high_watermark=kafka.hw,
                        factory=kafka.factory)
    session = slot.session()
    result = run_transaction(
        slot, [StagedMessage("orders", b"v")], [DecisionRecord("g")],
        "decisions", RetryPolicy(stop=tenacity.stop_after_attempt(1)), 1.0, "test",
        generation=session.generation,
    )
    return slot, kafka.producers[0], result


def test_system_error_before_commit_fails_before_commit() -> None:
    err = _system_error_from_fenced()
    slot, producer, result = _run(err)
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert isinstance(result.error, KafkaException)  # the Kafka error, not the SystemError
    assert result.error is err.__cause__
    assert "_FENCED" in result.detail and "SystemError" in result.detail
    assert "commit" not in producer.calls and "abort" in producer.calls
    assert not slot.alive  # discarded: the next transaction gets a fresh producer


def test_other_exception_before_commit_fails_before_commit() -> None:
    slot, producer, result = _run(RuntimeError("something unexpected in the client"))
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert isinstance(result.error, RuntimeError)
    assert "commit" not in producer.calls
    assert not slot.alive
