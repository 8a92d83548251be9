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

import hashlib
import json
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import IsolationLevel, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec

from ._enums import Phase
from .errors import ConfigurationError, DecisionTopicMisconfigured

__all__ = [
    "DECISION_COMMIT",
    "DecisionLog",
    "DecisionRecord",
    "DecisionTopic",
    "describe_decision_log",
    "ensure_decision_topic",
    "high_watermarks",
    "log_fingerprint",
    "log_start_offsets",
    "partition_for",
    "topic_config_problems",
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
            raise ConfigurationError("decision topic needs at least one partition")
        if self.retention_ms < _DAY_MS:
            raise ConfigurationError("decision topic retention below one day is unsafe")


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


def log_fingerprint(cluster_id: str, topic: str, topic_id: str) -> str:
    """12 hex digits naming one decision log: a topic (by name *and* id, so a
    topic deleted and re-created is another log) in one Kafka cluster.

    Every gid carries the fingerprint of the log its decision goes to;
    recovery decides a gid only from the log with the same fingerprint.
    """
    text = f"{cluster_id}\x00{topic}\x00{topic_id}".encode()
    return hashlib.blake2b(text, digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class DecisionLog:
    """A decision topic as found on a cluster, with what safety depends on."""

    cluster_id: str
    topic: str
    topic_id: str
    partitions: int
    cleanup_policy: str
    retention_ms: int
    retention_bytes: int
    unclean_leader_election: bool = False

    @property
    def fingerprint(self) -> str:
        return log_fingerprint(self.cluster_id, self.topic, self.topic_id)

    @property
    def compacted(self) -> bool:
        """Compaction may remove records without moving the log-start offset."""
        return "compact" in self.cleanup_policy


def describe_decision_log(admin: AdminClient, topic: str, timeout: float) -> DecisionLog:
    """Cluster id, topic id and the retention settings of an existing topic.

    Raises ``KafkaException`` when the cluster cannot be reached and
    :class:`LookupError` when the topic does not exist.
    """
    md = admin.list_topics(topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        reason = t.error.str() if t is not None and t.error is not None else "missing"
        raise LookupError(f"decision topic {topic!r} not found ({reason})")
    desc = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic].result(
        timeout)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs: dict[str, Any] = admin.describe_configs([res], request_timeout=timeout)[res].result(
        timeout)
    return DecisionLog(
        cluster_id=str(md.cluster_id),
        topic=topic,
        topic_id=str(desc.topic_id),
        partitions=len(t.partitions),
        cleanup_policy=str(configs["cleanup.policy"].value),
        retention_ms=int(configs["retention.ms"].value),
        retention_bytes=int(configs["retention.bytes"].value),
        unclean_leader_election=str(configs["unclean.leader.election.enable"].value) == "true",
    )


def log_start_offsets(admin: AdminClient, topic: str, partitions: Mapping[int, Any] | set[int],
                      timeout: float) -> dict[int, int]:
    """The first offset still in the log of each partition (records before it
    were deleted by retention or DeleteRecords)."""
    return _list_offsets(admin, topic, partitions, OffsetSpec.earliest(), timeout)  # type: ignore[no-untyped-call]


def high_watermarks(admin: AdminClient, topic: str, partitions: Mapping[int, Any] | set[int],
                    timeout: float) -> dict[int, int]:
    """The high watermark of each partition: every record appended later gets
    this offset or a higher one."""
    return _list_offsets(admin, topic, partitions, OffsetSpec.latest(), timeout)  # type: ignore[no-untyped-call]


def _list_offsets(admin: AdminClient, topic: str, partitions: Mapping[int, Any] | set[int],
                  spec: OffsetSpec, timeout: float) -> dict[int, int]:
    futures = admin.list_offsets(
        {TopicPartition(topic, p): spec for p in partitions},
        isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout)
    return {tp.partition: int(f.result(timeout).offset) for tp, f in futures.items()}


def topic_config_problems(log: DecisionLog, retention_ms: int) -> list[str]:
    """Why an existing decision topic could lose decisions (empty: none)."""
    problems = []
    if log.compacted or "delete" not in log.cleanup_policy:
        problems.append(f"cleanup.policy={log.cleanup_policy} (must be 'delete')")
    if log.retention_ms != -1 and log.retention_ms < retention_ms:
        problems.append(f"retention.ms={log.retention_ms} (must be >= {retention_ms} or -1)")
    if log.retention_bytes != -1:
        problems.append(f"retention.bytes={log.retention_bytes} (must be -1: size-based "
                        "deletion can drop decisions of transactions still in doubt)")
    if log.unclean_leader_election:
        problems.append("unclean.leader.election.enable=true (must be false: an unclean "
                        "election can truncate committed decisions)")
    return problems


def partition_for(instance: str, slot: int, partitions: int) -> int:
    """The decision partition of a producer slot (stable, client-independent).

    All decisions of one producer go to one partition, so each Kafka
    transaction adds a single decision partition.
    """
    return zlib.crc32(f"{instance}/{slot}".encode()) % partitions


def ensure_decision_topic(admin: AdminClient, topic: DecisionTopic,
                          timeout: float) -> DecisionLog:
    """Create the decision topic when missing, else check its configuration.

    Returns the log as found. Raises :class:`DecisionTopicMisconfigured` when
    an existing topic could lose decisions (compaction, short retention,
    size-based retention).
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
    try:
        log = describe_decision_log(admin, topic.name, timeout)
    except LookupError as exc:
        raise ConfigurationError(str(exc), phase=Phase.STARTUP) from None
    problems = topic_config_problems(log, topic.retention_ms)
    if problems:
        raise DecisionTopicMisconfigured(
            f"decision topic {topic.name!r} is misconfigured: " + "; ".join(problems),
            phase=Phase.STARTUP,
        )
    return log


def _wait_visible(admin: AdminClient, name: str, timeout: float) -> None:
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
