"""Kafka side of recovery: read a decision log (fencing is ``coordinator.fencing``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from coordinator.decision_log import (
    DecisionLog,
    DecisionRecord,
    describe_decision_log,
    high_watermarks,
    log_start_offsets,
)

from ._logfields import fields

__all__ = ["DecisionReader"]

log = logging.getLogger("recovery.kafka")

_PRODUCER_ONLY = ("transactional.id", "transaction.timeout.ms", "acks", "linger.ms",
                  "enable.idempotence")
_OUT_OF_RANGE = frozenset({KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE})


@dataclass
class _Partition:
    partition: int
    start: int
    position: int
    wanted: set[str] = field(default_factory=set)
    found: set[str] = field(default_factory=set)
    problem: str | None = None
    """Why this partition cannot be read to its end (records deleted under us)."""


class DecisionReader:
    """Reads one decision log with ``isolation.level=read_committed``.

    Each partition is read from the lowest ``floor`` of the gids searched in
    it: an offset observed before those transactions were prepared, so their
    decision records (produced after PREPARE) can only be there or later. No
    timestamp, hence no clock, is involved. ``auto.offset.reset=error``: if the
    records at the start offset are deleted meanwhile, the read fails loudly
    instead of jumping ahead.
    """

    def __init__(self, conf: Mapping[str, Any], topic: str, timeout: float) -> None:
        cconf = {k: v for k, v in conf.items() if k not in _PRODUCER_ONLY}
        self._admin = AdminClient(dict(cconf))
        cconf.update({
            "group.id": f"pk2pc-recovery-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 50,
        })
        self.topic = topic
        self.timeout = timeout
        self._consumer = Consumer(cconf)
        self._parts: dict[int, _Partition] = {}

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> DecisionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> DecisionLog:
        """The log as found (raises ``LookupError`` when the topic does not exist)."""
        return describe_decision_log(self._admin, self.topic, self.timeout)

    def plan(self, wanted: Mapping[int, set[str]], start: Mapping[int, int]) -> None:
        """The gids to look for in each partition and the offset to read from."""
        self._parts = {p: _Partition(p, start[p], start[p], set(wanted[p])) for p in wanted}
        self._consumer.assign(
            [TopicPartition(self.topic, p.partition, p.start) for p in self._parts.values()])

    def high_watermarks(self) -> dict[int, int]:
        """Each planned partition's high watermark, as of now."""
        return high_watermarks(self._admin, self.topic, set(self._parts), self.timeout)

    def log_starts(self) -> dict[int, int]:
        """Each planned partition's log-start offset, as of now."""
        return log_start_offsets(self._admin, self.topic, set(self._parts), self.timeout)

    def found(self) -> set[str]:
        return set().union(*(p.found for p in self._parts.values())) if self._parts else set()

    def problems(self) -> dict[int, str]:
        return {p.partition: p.problem for p in self._parts.values() if p.problem is not None}

    def read_until(self, targets: Mapping[int, int], stall: float, deadline: float) -> set[int]:
        """Read until each partition's position reaches its target offset.

        Returns the partitions that reached it. A partition stops early when
        its position has not moved for ``stall`` seconds (its last stable
        offset is held back by an open transaction), at ``deadline``, or when
        its records were deleted under the reader. Transient errors (a broker
        connection lost) are logged and the read goes on.
        """
        pending = {p for p, target in targets.items()
                   if self._parts[p].position < target and self._parts[p].problem is None}
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
                    self._on_error(err, msg.partition(), pending)
                    continue
                part = self._parts.get(msg.partition() or 0)
                record = DecisionRecord.decode(msg.key(), msg.value())
                if part is not None and record is not None and record.gid in part.wanted:
                    part.found.add(record.gid)
            if not pending:
                break
            positions = self._consumer.position(
                [TopicPartition(self.topic, p) for p in pending])
            for tp in positions:
                part = self._parts[tp.partition]
                if tp.offset >= 0 and tp.offset > part.position:
                    part.position = tp.offset
                    last_progress[tp.partition] = time.monotonic()
                if part.position >= targets[tp.partition]:
                    pending.discard(tp.partition)
        return {p for p, target in targets.items()
                if self._parts[p].position >= target and self._parts[p].problem is None}

    def _on_error(self, err: KafkaError, partition: int | None, pending: set[int]) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() in _OUT_OF_RANGE:
            parts = [partition] if partition is not None and partition in self._parts else list(
                pending)
            for p in parts:
                self._parts[p].problem = (
                    f"offset {self._parts[p].position} of partition {p} is out of range: "
                    f"records were deleted while reading ({err.str()})")
                pending.discard(p)
            return
        if err.fatal() or not (err.retriable() or err.code() in (
                KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                KafkaError._RESOLVE)):
            raise KafkaException(err)
        log.warning("decision log %s: transient consumer error, reading on: %s", self.topic,
                    err.str(), extra=fields())
