"""Recovery pointed at the wrong decision log refuses, never rolls back committed work:
another topic, a topic without registration, the topic deleted and re-created,
records deleted under it. And a coordinator with a custom decision topic needs no
flag: recovery finds the topic in the registry.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from coordinator import DecisionTopic, Step
from coordinator.gid import parse
from tests.integration.safety import crash_at, recover_cli, rows
from tests.plugins.kafka_helpers import create_topic

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def committed_in_kafka_then_dead(env: Env) -> tuple[str, str]:
    """A transaction whose Kafka commit passed and whose process "died" before COMMIT
    PREPARED."""
    gid, topic = crash_at(env, Step.AFTER_KAFKA_COMMIT)
    assert [r.value for r in env.read(topic)] == [b"a"]
    return gid, topic


def assert_then_recovered(env: Env, gid: str) -> None:
    """Still in doubt; a correct recovery then commits it."""
    assert env.prepared() == [gid]
    assert rows(env) == []
    code, report, stderr = recover_cli(env)
    assert code == 0, stderr
    assert report["committed"] == [gid]
    assert rows(env) == ["a"]


def test_wrong_decision_topic_is_refused(env: Env) -> None:
    gid, _ = committed_in_kafka_then_dead(env)
    empty = env.topic(partitions=3)
    code, report, _ = recover_cli(env, "--decision-topic", empty)
    assert code == 1
    assert report["remaining"] == [gid] and report["rolled_back"] == []
    assert "not the one its coordinator registered" in report["remaining_reasons"][gid]
    assert report["fenced_transactional_ids"] == []
    assert_then_recovered(env, gid)


def test_wrong_decision_topic_without_registration_is_refused(env: Env) -> None:
    # Even with the registry gone (or unreadable), the gid's log fingerprint protects it.
    gid, _ = committed_in_kafka_then_dead(env)
    env.execute("DROP TABLE pk2pc_decision_logs")
    empty = env.topic(partitions=3)
    code, report, _ = recover_cli(env, "--decision-topic", empty)
    assert code == 1 and report["rolled_back"] == []
    assert "is not its decision log" in report["remaining_reasons"][gid]
    code, report, _ = recover_cli(env)  # the default topic name: missing here
    assert code == 1 and report["rolled_back"] == []
    code, report, stderr = recover_cli(env, "--decision-topic", env.decision_topic.name)
    assert code == 0, stderr
    assert report["committed"] == [gid]


def test_custom_decision_topic_found_from_the_registry(env: Env) -> None:
    # A coordinator with a custom decision topic and a cron job left on the default.
    gid, _ = committed_in_kafka_then_dead(env)
    assert env.decision_topic.name != DecisionTopic().name
    assert_then_recovered(env, gid)


def test_decision_topic_recreated_is_refused(env: Env) -> None:
    gid, _ = committed_in_kafka_then_dead(env)
    admin = AdminClient(env.kafka)
    for fut in admin.delete_topics([env.decision_topic.name], operation_timeout=30).values():
        fut.result(30)
    deadline = time.monotonic() + 60
    while True:  # re-create it, empty, with the same name (a new topic id)
        try:
            create_topic(env.bootstrap, env.decision_topic.name, partitions=3)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    code, report, _ = recover_cli(env)
    assert code == 1 and report["rolled_back"] == [] and report["remaining"] == [gid]
    assert "re-created" in report["remaining_reasons"][gid]
    assert env.prepared() == [gid]


def test_decision_records_deleted_is_refused(env: Env) -> None:
    gid, _ = committed_in_kafka_then_dead(env)
    g = parse(gid)
    admin = AdminClient(env.kafka)
    tp = TopicPartition(env.decision_topic.name, g.partition)
    high = admin.list_offsets({tp: OffsetSpec.latest()})[tp].result(30).offset  # type: ignore[no-untyped-call]
    deleted = admin.delete_records([TopicPartition(env.decision_topic.name, g.partition, high)])
    for fut in deleted.values():
        fut.result(30)
    code, report, _ = recover_cli(env)
    assert code == 1 and report["rolled_back"] == [] and report["remaining"] == [gid]
    assert "records were deleted" in report["remaining_reasons"][gid]
    assert env.prepared() == [gid]


