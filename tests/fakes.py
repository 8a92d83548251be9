"""Scriptable stand-ins for confluent-kafka's transactional producer and consumer, for
unit tests of the coordinator's Kafka logic where only Kafka-internal timing could
produce a case (an abortable error after a retried commit, a session replaced between
two calls, an offset lookup gone wrong), of the group committer's batching (which
decision records each Kafka transaction carried) and of the consume loop's decisions.
Integration tests always use the real broker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition


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


@dataclass
class FakeConsumer:
    """Delivers scripted batches, then nothing; records pauses, resumes and seeks."""

    batches: list[list[Message]]
    done: bool = False
    """The script has run out (the loop's stop)."""
    calls: list[str] = field(default_factory=list)
    seeks: list[tuple[int, int]] = field(default_factory=list)
    polled: list[Message] = field(default_factory=list)
    """What the polls return (of partitions a rebalance assigned meanwhile), then None."""
    group: dict[int, int] = field(default_factory=dict)
    """The group's committed offsets, per partition."""
    committed_calls: int = 0
    committed_fails: set[int] = field(default_factory=set)
    """Which calls of committed() (1, 2, ...) time out."""
    consume_raises: BaseException | None = None
    """What consume() raises once the scripted batches have run out."""
    generation: int = 1
    """The group's generation (a rebalance raises it)."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if not self.batches and self.consume_raises is not None:
            raise self.consume_raises
        self.done = not self.batches
        return self.batches.pop(0) if self.batches else []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("in", 0), TopicPartition("in", 1)]

    def consumer_group_metadata(self) -> bytes:
        return f"group in, generation {self.generation}".encode()

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.committed_calls += 1
        if self.committed_calls in self.committed_fails:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return [TopicPartition(tp.topic, tp.partition, self.group.get(tp.partition, -1001))
                for tp in tps]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def pause(self, tps: list[TopicPartition]) -> None:
        self.calls.append("pause")

    def resume(self, tps: list[TopicPartition]) -> None:
        self.calls.append("resume")

    def poll(self, timeout: float) -> Message | None:
        self.calls.append("poll")
        return self.polled.pop(0) if self.polled else None
