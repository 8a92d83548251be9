"""A batch of consumed Kafka messages inside a coordinated transaction: the offsets
it commits (in the Kafka transaction, with the consumer's group metadata) and how
the consumer is rewound when it does not commit."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from ._errmap import describe
from ._kafka import ConsumedOffsets
from .errors import UsageError

__all__ = ["ConsumedBatch", "rewind"]

log = logging.getLogger("coordinator.consume")


@dataclass(frozen=True, slots=True)
class ConsumedBatch:
    """What a transaction consumed: per partition, the first offset and the next one."""

    consumer: Consumer
    first: dict[tuple[str, int], int]
    next: dict[tuple[str, int], int]
    headers: tuple[tuple[tuple[str, bytes], ...], ...] = ()
    """The consumed messages' headers (for observers, e.g. to continue a trace)."""

    @classmethod
    def of(cls, consumer: Consumer, messages: Sequence[Message]) -> ConsumedBatch:
        first: dict[tuple[str, int], int] = {}
        nxt: dict[tuple[str, int], int] = {}
        headers = []
        for m in messages:
            if m.error() is not None:
                raise UsageError(f"consumed= holds an error event, not a message: {m.error()}")
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            if topic is None or partition is None or offset is None or offset < 0:
                raise UsageError("consumed= holds a message without topic, partition or offset")
            key = (topic, partition)
            first[key] = min(first.get(key, offset), offset)
            nxt[key] = max(nxt.get(key, 0), offset + 1)
            headers.append(tuple((str(h[0]), h[1] if isinstance(h[1], bytes) else b"")
                                 for h in m.headers() or ()))
        return cls(consumer, first, nxt, tuple(headers))

    def offsets(self, group_metadata: Any) -> ConsumedOffsets:
        return ConsumedOffsets(id(self.consumer), group_metadata,
                               tuple((t, p, o) for (t, p), o in sorted(self.next.items())))


def rewind(consumer: Consumer, first: Mapping[tuple[str, int], int | None], timeout: float,
           extra: Mapping[str, object] | None = None) -> None:
    """Seek each partition back to the group's committed offset, so that what did
    not commit is delivered again. ``first`` is where to go when the group has no
    offset yet or its offsets cannot be read: the lowest offset known not to be
    committed; None: not known -- then a partition the group has no offset for goes
    back to its start (nothing of it is committed), and one whose offset could not be
    read is left where it is (the warning says so). Partitions no longer assigned
    are left to their new owner, which starts from the committed offsets."""
    if not first:
        return
    answered = True
    try:
        committed = consumer.committed([TopicPartition(t, p) for t, p in first], timeout)
    except KafkaException as exc:
        answered = False
        log.warning("cannot read the committed offsets to rewind (%s); seeking to the "
                    "batch's first offsets", describe(exc), extra=extra)
        committed = [TopicPartition(t, p, -1) for t, p in first]
    for tp in committed:
        offset = tp.offset if tp.offset >= 0 else first[(tp.topic, tp.partition)]
        if offset is None and answered and tp.error is None:
            offset = OFFSET_BEGINNING  # no committed offset: nothing of it is committed
        if offset is None:
            log.warning("not rewinding %s[%d]: its committed offset is not known",
                        tp.topic, tp.partition, extra=extra)
            continue
        try:
            consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        except KafkaException as exc:
            log.info("not rewinding %s[%d] (%s): no longer assigned to this consumer?",
                     tp.topic, tp.partition, describe(exc), extra=extra)
