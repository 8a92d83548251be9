"""Kafka side of recovery: fence a transactional.id, read the decision log."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

__all__ = ["DecisionReader", "fence"]

log = logging.getLogger("recovery.kafka")

_CONSUMER_ONLY_DROP = ("transactional.id", "transaction.timeout.ms", "acks", "linger.ms",
                       "enable.idempotence")


def fence(transactional_id: str, conf: Mapping[str, Any], timeout: float) -> None:
    """Fence every older producer with ``transactional_id``.

    ``init_transactions()`` bumps the producer epoch: an open transaction of
    the old producer is aborted, a commit it already started is completed
    first; afterwards the old producer can neither produce nor commit.
    """
    producer = Producer({**conf, "transactional.id": transactional_id,
                         "transaction.timeout.ms": 10_000})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                producer.init_transactions(max(1.0, deadline - time.monotonic()))
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.retriable() and (
                    time.monotonic() < deadline
                ):
                    continue
                raise
    finally:
        producer.close()


@dataclass
class _Partition:
    partition: int
    start: int = 0
    position: int = 0
    wanted: set[str] = field(default_factory=set)
    found: set[str] = field(default_factory=set)


class DecisionReader:
    """Reads decision partitions with ``isolation.level=read_committed``.

    Each partition is read from the offset of a timestamp a little before the
    oldest prepare time of the gids searched in it, so the cost grows with
    the traffic since the oldest in-doubt transaction, not with the log.
    """

    def __init__(self, conf: Mapping[str, Any], topic: str, timeout: float) -> None:
        cconf = {k: v for k, v in conf.items() if k not in _CONSUMER_ONLY_DROP}
        self._admin_conf = dict(cconf)
        cconf.update({
            "group.id": f"pk2pc-recovery-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 50,
        })
        self.topic = topic
        self.timeout = timeout
        self._consumer = Consumer(cconf)
        # Offsets by time and the high watermark come from a read_uncommitted
        # consumer: with read_committed, ListOffsets answers with the last stable
        # offset instead, which lags behind open transactions.
        self._meta = Consumer({**cconf, "isolation.level": "read_uncommitted"})
        self._parts: dict[int, _Partition] = {}

    def close(self) -> None:
        self._consumer.close()
        self._meta.close()

    def __enter__(self) -> DecisionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_topic(self) -> int:
        """Raise when the decision topic cannot be reached; return its partitions."""
        md = self._meta.list_topics(self.topic, timeout=self.timeout)
        t = md.topics.get(self.topic)
        if t is None or t.error is not None:
            reason = t.error.str() if t is not None and t.error is not None else "missing"
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                            f"decision topic {self.topic}: {reason}"))
        return len(t.partitions)

    def retention_seconds(self) -> float | None:
        """The decision topic's ``retention.ms`` in seconds (``None``: unlimited)."""
        admin = AdminClient(self._admin_conf)
        res = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
        configs = admin.describe_configs([res], request_timeout=self.timeout)[res].result(
            self.timeout)
        ms = int(configs["retention.ms"].value)
        return None if ms < 0 else ms / 1000.0

    def plan(self, wanted: Mapping[int, Collection[str]], start_ms: Mapping[int, int]) -> None:
        """Set the gids to look for per partition and where to start reading."""
        tps = [TopicPartition(self.topic, p, ms) for p, ms in start_ms.items()]
        offsets = self._meta.offsets_for_times(tps, timeout=self.timeout)
        for tp in offsets:
            if tp.error is not None:
                raise KafkaException(tp.error)
            start = tp.offset
            if start < 0:  # no record at or after the timestamp: start at the end
                start = self.high_watermark(tp.partition)
            self._parts[tp.partition] = _Partition(
                tp.partition, start, start, set(wanted[tp.partition]))
        self._consumer.assign(
            [TopicPartition(self.topic, p.partition, p.start) for p in self._parts.values()])

    def high_watermark(self, partition: int) -> int:
        _, high = self._meta.get_watermark_offsets(
            TopicPartition(self.topic, partition), timeout=self.timeout, cached=False)
        return int(high)

    def found(self) -> set[str]:
        return set().union(*(p.found for p in self._parts.values())) if self._parts else set()

    def read_until(self, targets: Mapping[int, int], stall: float, deadline: float) -> set[int]:
        """Read until each partition's position reaches its target offset.

        Returns the partitions that reached it. A partition stops early when
        its position has not moved for ``stall`` seconds (its last stable
        offset is held back by an open transaction) or at ``deadline``.
        """
        pending = {p for p, target in targets.items() if self._parts[p].position < target}
        last_progress = {p: time.monotonic() for p in pending}
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            for p in list(pending):
                if now - last_progress[p] > stall:
                    pending.discard(p)
            if not pending:
                break
            for msg in self._consumer.consume(num_messages=2000, timeout=0.1):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                part = self._parts.get(msg.partition() or 0)
                key = msg.key()
                if part is not None and key is not None:
                    k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                    if k in part.wanted:
                        part.found.add(k)
            positions = self._consumer.position(
                [TopicPartition(self.topic, p) for p in pending])
            for tp in positions:
                part = self._parts[tp.partition]
                if tp.offset >= 0 and tp.offset > part.position:
                    part.position = tp.offset
                    last_progress[tp.partition] = time.monotonic()
                if part.position >= targets[tp.partition]:
                    pending.discard(tp.partition)
        return {p for p, target in targets.items() if self._parts[p].position >= target}
