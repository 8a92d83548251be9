"""How recovery's decision-log reader treats consumer errors (no services: the
reader's error handling is fed KafkaError values directly) and which
transaction.timeout.ms its fence uses."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError, KafkaException

from coordinator import CoordinatorConfig
from coordinator.registry import RegisteredLog
from recovery import RecoveryConfig
from recovery._kafka import DecisionReader
from recovery._worker import _fence_timeout_ms


@pytest.fixture
def reader() -> Iterator[DecisionReader]:
    r = DecisionReader({"bootstrap.servers": "127.0.0.1:1", "log_level": 0}, "decisions", 1.0)
    r.plan({0: {"g"}, 1: {"h"}}, {0: 5, 1: 7})
    yield r
    r.close()


@pytest.mark.parametrize("code", [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                  KafkaError._TIMED_OUT, KafkaError._RESOLVE])
def test_transient_consumer_errors_do_not_end_the_read(reader: DecisionReader,
                                                       code: int) -> None:
    pending = {0, 1}
    reader._on_error(KafkaError(code, "transient"), None, pending)
    assert pending == {0, 1} and reader.problems() == {}


def test_records_deleted_under_the_reader_stop_that_partition(reader: DecisionReader) -> None:
    pending = {0, 1}
    reader._on_error(KafkaError(KafkaError._AUTO_OFFSET_RESET, "out of range"), 1, pending)
    assert pending == {0}
    assert "out of range" in reader.problems()[1]


def test_fatal_consumer_errors_raise(reader: DecisionReader) -> None:
    with pytest.raises(KafkaException):
        reader._on_error(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied"), 0,
                         {0, 1})


def registered(timeout_ms: int) -> RegisteredLog:
    return RegisteredLog("00aa11bb22cc", "orders", "cid", "t", "tid", timeout_ms,
                         datetime.now(UTC))


def test_the_fence_uses_the_coordinators_transaction_timeout() -> None:
    cfg = RecoveryConfig()
    assert _fence_timeout_ms({}, cfg, registered(4_000)) == 4_000
    assert _fence_timeout_ms({}, cfg, None) == CoordinatorConfig().transaction_timeout_ms
    assert _fence_timeout_ms({"transaction.timeout.ms": "3000"}, cfg, registered(4_000)) == 3000
    assert _fence_timeout_ms({}, RecoveryConfig(transaction_timeout_ms=2_000),
                             registered(4_000)) == 2_000
