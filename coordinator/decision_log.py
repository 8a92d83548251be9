"""The decision log: a Kafka topic holding one record per committed transaction.

The coordinator produces the decision record in the *same* Kafka transaction
as the business messages, so the record exists exactly when the commit point
has passed. Recovery looks a gid up by its key in the partition the gid names.

Retention must outlive the longest time a transaction can stay in doubt
(until recovery runs): time-based deletion, 7 days by default. Compaction is
refused: it never drops unique keys, so the topic would grow forever, and a
compacted topic offers nothing here since every key is written once.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ._enums import Phase
from .errors import ConfigurationError, DecisionTopicMisconfigured

__all__ = [
    "DECISION_COMMIT",
    "DecisionRecord",
    "DecisionTopic",
    "ensure_decision_topic",
    "partition_for",
]

DECISION_COMMIT = "commit"
_HEADER = "pk2pc-decision"
_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class DecisionTopic:
    """Where decisions go and how the topic must be configured."""

    name: str = "pk2pc.decisions"
    partitions: int = 6
    """Used when the coordinator creates the topic."""
    retention_ms: int = 7 * _DAY_MS
    """Retention set at creation; also the minimum accepted on an existing topic."""
    replication_factor: int | None = None
    """``None``: min(3, number of brokers)."""

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("decision topic needs at least one partition")
        if self.retention_ms < _DAY_MS:
            raise ValueError("decision topic retention below one day is unsafe")


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """The commit decision of one transaction; the Kafka key is the gid."""

    gid: str
    decision: str = DECISION_COMMIT

    def key(self) -> bytes:
        return self.gid.encode()

    def value(self) -> bytes:
        return json.dumps({"gid": self.gid, "decision": self.decision}).encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return [(_HEADER, b"1")]

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> DecisionRecord | None:
        """Decode a record read from the topic; ``None`` for anything else."""
        if not key or not value:
            return None
        try:
            obj = json.loads(value)
            gid = key.decode()
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(obj, dict) or obj.get("gid") != gid:
            return None
        decision = obj.get("decision")
        if decision != DECISION_COMMIT:
            return None
        return cls(gid=gid, decision=decision)


def partition_for(instance: str, slot: int, partitions: int) -> int:
    """The decision partition of a producer slot (stable, client-independent).

    All decisions of one producer go to one partition, so each Kafka
    transaction adds a single decision partition.
    """
    return zlib.crc32(f"{instance}/{slot}".encode()) % partitions


def ensure_decision_topic(admin: AdminClient, topic: DecisionTopic, timeout: float) -> int:
    """Create the decision topic when missing, else check its configuration.

    Returns the topic's partition count. Raises
    :class:`DecisionTopicMisconfigured` when an existing topic could lose
    decisions (compaction, short retention, size-based retention).
    """
    md = admin.list_topics(timeout=timeout)
    if topic.name not in md.topics or md.topics[topic.name].error is not None:
        brokers = max(1, len(md.brokers))
        rf = topic.replication_factor or min(3, brokers)
        new = NewTopic(
            topic.name,
            num_partitions=topic.partitions,
            replication_factor=rf,
            config={
                "cleanup.policy": "delete",
                "retention.ms": str(topic.retention_ms),
                "retention.bytes": "-1",
                **({"min.insync.replicas": "2"} if rf >= 3 else {}),
            },
        )
        fut = admin.create_topics([new], operation_timeout=timeout, request_timeout=timeout)
        try:
            fut[topic.name].result(timeout)
        except Exception as exc:  # TOPIC_ALREADY_EXISTS when another instance raced us
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise ConfigurationError(
                    f"cannot create decision topic {topic.name!r}: {exc}", phase=Phase.STARTUP
                ) from exc
        _wait_visible(admin, topic.name, timeout)
        md = admin.list_topics(topic.name, timeout=timeout)
    _check_config(admin, topic, timeout)
    return len(md.topics[topic.name].partitions)


def _wait_visible(admin: AdminClient, name: str, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(name, timeout=timeout)
        t = md.topics.get(name)
        if t is not None and t.error is None and t.partitions and all(
            p.leader >= 0 for p in t.partitions.values()
        ):
            return
        if time.monotonic() > deadline:
            raise ConfigurationError(
                f"decision topic {name!r} not available after {timeout}s", phase=Phase.STARTUP
            )
        time.sleep(0.1)


def _check_config(admin: AdminClient, topic: DecisionTopic, timeout: float) -> None:
    res = ConfigResource(ConfigResource.Type.TOPIC, topic.name)
    configs: dict[str, Any] = admin.describe_configs([res], request_timeout=timeout)[res].result(
        timeout
    )
    policy = str(configs["cleanup.policy"].value)
    retention = int(configs["retention.ms"].value)
    retention_bytes = int(configs["retention.bytes"].value)
    problems = []
    if "compact" in policy or "delete" not in policy:
        problems.append(f"cleanup.policy={policy} (must be 'delete')")
    if retention != -1 and retention < topic.retention_ms:
        problems.append(f"retention.ms={retention} (must be >= {topic.retention_ms} or -1)")
    if retention_bytes != -1:
        problems.append(f"retention.bytes={retention_bytes} (must be -1: size-based deletion "
                        "can drop decisions of transactions still in doubt)")
    if problems:
        raise DecisionTopicMisconfigured(
            f"decision topic {topic.name!r} is misconfigured: " + "; ".join(problems),
            phase=Phase.STARTUP,
        )
