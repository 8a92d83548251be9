"""A scriptable stand-in for confluent-kafka's transactional producer, for unit tests
of the coordinator's Kafka logic where only Kafka-internal timing could produce a case
(an abortable error after a retried commit, a session replaced between two calls).
Integration tests always use the real broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException


def kafka_error(code: int, *, retriable: bool = False, txn_requires_abort: bool = False,
                fatal: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, f"scripted {code}", fatal=fatal,
                                     retriable=retriable, txn_requires_abort=txn_requires_abort))


@dataclass
class _Msg:
    _topic: str
    _offset: int

    def topic(self) -> str:
        return self._topic

    def offset(self) -> int:
        return self._offset


@dataclass
class FakeProducer:
    conf: dict[str, Any]
    calls: list[str] = field(default_factory=list)
    commit_errors: list[BaseException] = field(default_factory=list)
    """Raised by successive commit_transaction() calls, then success."""
    flush_error: BaseException | None = None
    next_offset: int = 100
    _pending: list[tuple[str, Any]] = field(default_factory=list)

    def init_transactions(self, timeout: float | None = None) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.calls.append(f"produce {topic}")
        self._pending.append((topic, kwargs.get("on_delivery")))

    def flush(self, timeout: float | None = None) -> int:
        self.calls.append("flush")
        if self.flush_error is not None:
            raise self.flush_error
        for topic, callback in self._pending:
            if callback is not None:
                callback(None, _Msg(topic, self.next_offset))
            self.next_offset += 1
        self._pending.clear()
        return 0

    def commit_transaction(self, timeout: float | None = None) -> None:
        self.calls.append("commit")
        if self.commit_errors:
            raise self.commit_errors.pop(0)

    def abort_transaction(self, timeout: float | None = None) -> None:
        self.calls.append("abort")

    def purge(self, **kwargs: Any) -> None:
        self.calls.append("purge")

    def close(self) -> None:
        self.calls.append("close")


@dataclass
class FakeKafka:
    """A producer factory that keeps every producer it made, scripted in advance."""

    producers: list[FakeProducer] = field(default_factory=list)
    script: list[dict[str, Any]] = field(default_factory=list)
    """Attributes for the next producers made, in order (e.g. commit_errors)."""
    high_watermark: int = 40

    def factory(self, conf: dict[str, Any]) -> Any:
        p = FakeProducer(dict(conf))
        if self.script:
            for k, v in self.script.pop(0).items():
                setattr(p, k, v)
        self.producers.append(p)
        return p

    def hw(self, partition: int) -> int:
        return self.high_watermark
