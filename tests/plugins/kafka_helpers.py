"""Kafka helpers for tests: create and delete topics, read what a consumer can see.

`read_committed(bootstrap, topic)` returns every record an `isolation.level=read_committed`
consumer sees from the start of the topic up to the high watermark taken when it is
called. It waits until the consumer's position passes that watermark, so records of a
transaction committed before the call are returned even while its commit markers are still
being written; an aborted transaction's records are never returned. A transaction still
open holds read_committed consumers back: the call then fails after `timeout` seconds.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def create_topic(
    bootstrap: str,
    name: str,
    *,
    partitions: int = 1,
    replication_factor: int = -1,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create a topic and wait until its metadata shows every partition with a leader.

    `replication_factor=-1` takes the broker's default.replication.factor.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                     config=config or {})
    admin.create_topics([topic], request_timeout=timeout)[name].result(timeout=timeout)
    wait_topic_visible(bootstrap, name, partitions, timeout)


def wait_topic_visible(bootstrap: str, name: str, partitions: int, timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        found = admin.list_topics(name, timeout=timeout).topics.get(name)
        if (found is not None and found.error is None and len(found.partitions) == partitions
                and all(p.leader >= 0 for p in found.partitions.values())):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not visible with {partitions} partitions "
                               f"within {timeout} s (last metadata: {found})")
        time.sleep(0.1)


def delete_topics(bootstrap: str, names: Iterable[str], timeout: float = 10.0) -> None:
    """Best effort: delete the topics, ignoring failures (a missing topic, a slow broker)."""
    names = list(names)
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the futures are done
    futures = admin.delete_topics(names, request_timeout=timeout)
    for future in futures.values():
        with contextlib.suppress(KafkaException, TimeoutError):
            future.result(timeout=timeout)


def transactional_producer(
    bootstrap: str, transactional_id: str | None = None, *, timeout: float = 30.0, **config: Any
) -> Producer:
    """A Producer with `init_transactions()` done (a random transactional.id by default)."""
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": transactional_id or f"test-{uuid.uuid4().hex}",
        **config,
    })
    producer.init_transactions(timeout)
    return producer


def read_committed(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Record]:
    """Everything a read_committed consumer sees in `topic` (see the module docstring)."""
    return read_all(bootstrap, topic, isolation_level="read_committed", timeout=timeout)


def read_uncommitted(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Record]:
    """Everything in `topic`, including records of aborted and open transactions."""
    return read_all(bootstrap, topic, isolation_level="read_uncommitted", timeout=timeout)


def values(records: Iterable[Record]) -> list[bytes | None]:
    return [r.value for r in records]


def read_all(bootstrap: str, topic: str, *, isolation_level: str, timeout: float) -> list[Record]:
    """Read every partition of `topic` from its start up to the high watermark seen now."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-reader-{uuid.uuid4().hex}",
        "isolation.level": isolation_level,
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    try:
        partitions = _partitions(consumer, topic, timeout)
        bounds = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                  for p in partitions}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in bounds.items()])
        ends = {p: high for p, (_, high) in bounds.items()}
        return _consume_until(consumer, topic, ends, {p: low for p, (low, _) in bounds.items()},
                              time.monotonic() + timeout, isolation_level)
    finally:
        consumer.close()


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    found = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if found is None or found.error is not None:
        raise KafkaException(found.error if found is not None else f"no topic {topic}")
    return sorted(found.partitions)


def _consume_until(
    consumer: Consumer,
    topic: str,
    ends: dict[int, int],
    positions: dict[int, int],
    deadline: float,
    isolation_level: str,
) -> list[Record]:
    records: list[Record] = []
    while any(positions[p] < ends[p] for p in ends):
        if time.monotonic() > deadline:
            behind = {p: f"{positions[p]}/{ends[p]}" for p in ends if positions[p] < ends[p]}
            raise TimeoutError(
                f"{isolation_level} read of {topic}: partitions not read up to their high "
                f"watermark in time (position/end: {behind}); is a transaction left open?"
            )
        msg = consumer.poll(0.2)
        if msg is not None:
            error, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
            if error is None:
                records.append(_record(msg))
                positions[partition] = max(positions[partition], offset + 1)
            elif error.code() == KafkaError._PARTITION_EOF:
                positions[partition] = max(positions[partition], offset)
            else:
                raise KafkaException(error)
        for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
            if tp.offset >= 0:
                positions[tp.partition] = max(positions[tp.partition], tp.offset)
    return sorted(records, key=lambda r: (r.partition, r.offset))


def _record(msg: Message) -> Record:
    key, value = msg.key(), msg.value()
    raw = msg.headers() or []
    headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
    return Record(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        key=key.encode() if isinstance(key, str) else key,
        value=value.encode() if isinstance(value, str) else value,
        headers=tuple((k, v.encode() if isinstance(v, str) else v) for k, v in headers),
    )
