"""``run_transaction`` when the client raises something other than a KafkaException
before the commit (found by the fault campaign, issue 6; see
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

from coordinator._kafka import KafkaOutcome, ProducerSlot, StagedMessage, run_transaction
from coordinator.config import RetryPolicy
from coordinator.decision_log import DecisionRecord


class FlushRaises:
    """Just enough of a transactional producer; ``flush()`` raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.calls.append(f"produce {topic}")

    def flush(self, timeout: float | None = None) -> int:
        self.calls.append("flush")
        raise self.exc

    def commit_transaction(self, *args: Any) -> None:
        self.calls.append("commit")

    def abort_transaction(self, *args: Any) -> None:
        self.calls.append("abort")

    def purge(self, **kwargs: Any) -> None:
        self.calls.append("purge")

    def close(self) -> None:
        self.calls.append("close")


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


def _run(producer: FlushRaises) -> tuple[ProducerSlot, Any]:
    slot = ProducerSlot(0, "pk2pc.t:i:0", 0, {"bootstrap.servers": "127.0.0.1:1"}, 1.0)
    slot._producer = producer  # type: ignore[assignment]
    result = run_transaction(
        slot, [StagedMessage("orders", b"v")], [DecisionRecord("pk2pc1:t:i:0:0:" + "0" * 32)],
        "decisions", RetryPolicy(stop=tenacity.stop_after_attempt(1)), 1.0, "test",
    )
    return slot, result


def test_system_error_before_commit_fails_before_commit() -> None:
    err = _system_error_from_fenced()
    producer = FlushRaises(err)
    slot, result = _run(producer)
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert isinstance(result.error, KafkaException)  # the Kafka error, not the SystemError
    assert result.error is err.__cause__
    assert "_FENCED" in result.detail and "SystemError" in result.detail
    assert "commit" not in producer.calls and "abort" in producer.calls
    assert not slot.alive  # discarded: the next transaction gets a fresh producer


def test_other_exception_before_commit_fails_before_commit() -> None:
    producer = FlushRaises(RuntimeError("something unexpected in the client"))
    slot, result = _run(producer)
    assert result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
    assert isinstance(result.error, RuntimeError)
    assert "commit" not in producer.calls
    assert not slot.alive
