"""A scriptable stand-in for confluent-kafka's transactional producer, for unit tests
of the coordinator's Kafka logic where only Kafka-internal timing could produce a case
(an abortable error after a retried commit, a session replaced between two calls), and
of the group committer's batching (which decision records each Kafka transaction
carried). Integration tests always use the real broker."""

from __future__ import annotations

import time
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
class FakeTransaction:
    """One Kafka transaction of a fake producer: what it produced, and how it ended."""

    produced: list[tuple[str, bytes | None]]
    """(topic, key) of every message, in order."""
    outcome: str
    """``committed`` or ``aborted``."""

    def keys(self, topic: str) -> list[str]:
        """The keys of the messages produced to ``topic`` (for the decision topic: the
        gids whose decision records the transaction carried)."""
        return [(key or b"").decode() for t, key in self.produced if t == topic]


@dataclass
class FakeProducer:
    conf: dict[str, Any]
    calls: list[str] = field(default_factory=list)
    commit_errors: list[BaseException] = field(default_factory=list)
    """Raised by successive commit_transaction() calls, then success."""
    flush_error: BaseException | None = None
    commit_delay: float = 0.0
    """Seconds commit_transaction() takes."""
    next_offset: int = 100
    transactions: list[FakeTransaction] = field(default_factory=list)
    """Every transaction that committed or was aborted (shared by a :class:`FakeKafka`'s
    producers, in the order they ended)."""
    _pending: list[tuple[str, Any]] = field(default_factory=list)
    _produced: list[tuple[str, bytes | None]] = field(default_factory=list)

    def init_transactions(self, timeout: float | None = None) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self._produced = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.calls.append(f"produce {topic}")
        self._pending.append((topic, kwargs.get("on_delivery")))
        self._produced.append((topic, kwargs.get("key")))

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
        if self.commit_delay:
            time.sleep(self.commit_delay)
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.transactions.append(FakeTransaction(list(self._produced), "committed"))

    def abort_transaction(self, timeout: float | None = None) -> None:
        self.calls.append("abort")
        self.transactions.append(FakeTransaction(list(self._produced), "aborted"))

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
    defaults: dict[str, Any] = field(default_factory=dict)
    """Attributes for every producer made (e.g. commit_delay); ``script`` wins."""
    high_watermark: int = 40
    transactions: list[FakeTransaction] = field(default_factory=list)
    """Every transaction of its producers that committed or was aborted, in order."""

    def factory(self, conf: dict[str, Any]) -> Any:
        p = FakeProducer(dict(conf), transactions=self.transactions)
        for k, v in self.defaults.items():
            setattr(p, k, v)
        if self.script:
            for k, v in self.script.pop(0).items():
                setattr(p, k, v)
        self.producers.append(p)
        return p

    def hw(self, partition: int) -> int:
        return self.high_watermark
