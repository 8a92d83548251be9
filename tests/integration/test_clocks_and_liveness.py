"""Clocks, SQLSTATE class 40, and recovery's own liveness.

* A coordinator host whose clock runs 10 minutes behind: recovery still finds its
  decisions (the search starts at an offset, not a timestamp); start-up refuses a host
  clock far from PostgreSQL's.
* A serialization failure at COMMIT is a rollback, not an unknown outcome.
* The fence uses the coordinator's registered transaction timeout.
* Only the coordinator writes to the decision topic.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition

from coordinator import ConfigurationError, OutcomeUnknown, RolledBack, Status, Step, UsageError
from coordinator.gid import parse
from tests.integration.safety import crash_at, make_table, next_event, one_op, recover_cli, rows

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


needs_faketime = pytest.mark.skipif(shutil.which("faketime") is None,
                                    reason="libfaketime (Debian package faketime) missing")


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def create_time_ms(env: Env, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": env.bootstrap, "group.id": "ts-probe",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return int(msg.timestamp()[1])
        raise AssertionError("no record in the decision partition")
    finally:
        consumer.close()


class ClockBehindProducer(Producer):
    """A real producer whose record timestamps (CreateTime) come from a clock 10 minutes
    behind: what a coordinator on a host with a skewed clock writes. (libfaketime cannot
    be used for this: librdkafka's timed waits hang under it.)"""

    def produce(self, *args: Any, **kwargs: Any) -> None:
        kwargs["timestamp"] = int((time.time() - 600) * 1000)
        super().produce(*args, **kwargs)


def test_coordinator_clock_ten_minutes_behind(env: Env) -> None:
    gid, _ = crash_at(env, Step.AFTER_KAFKA_COMMIT, producer_factory=ClockBehindProducer)
    assert create_time_ms(env, env.decision_topic.name, parse(gid).partition) < (
        time.time() - 500) * 1000  # the decision was stamped 10 minutes "ago"
    code, report, stderr = recover_cli(env)
    assert code == 0, stderr
    assert report["committed"] == [gid]
    assert rows(env) == ["a"]


@needs_faketime
def test_startup_refuses_a_skewed_host_clock(env: Env,
                                             procs: list[subprocess.Popen[str]]) -> None:
    make_table(env)
    proc = one_op(env, env.topic(), "after_kafka_commit:kill", faketime="-600s")
    procs.append(proc)
    event = next_event(proc)
    assert event["event"] == "open_failed" and event["error"] == "ConfigurationError"
    assert "behind" in event["message"]
    assert proc.wait(60) == 3


def test_serialization_failure_at_commit_is_rolled_back(env: Env) -> None:
    env.execute("CREATE TABLE oncall (doctor text PRIMARY KEY, on_call bool NOT NULL)")
    env.execute("INSERT INTO oncall VALUES ('alice', true), ('bob', true)")
    coord = env.coordinator()
    other = psycopg.connect(env.dsn)
    try:
        tx = coord.transaction()  # one-phase: no message
        with pytest.raises(RolledBack) as info, tx:
            tx.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            tx.execute("SELECT count(*) FROM oncall WHERE on_call")
            other.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            other.execute("SELECT count(*) FROM oncall WHERE on_call")
            other.execute("UPDATE oncall SET on_call = false WHERE doctor = 'bob'")
            tx.execute("UPDATE oncall SET on_call = false WHERE doctor = 'alice'")
            other.commit()  # write skew: the block's COMMIT must fail (40001)
        assert not isinstance(info.value, OutcomeUnknown)
        cause = info.value.__cause__
        assert isinstance(cause, psycopg.errors.SerializationFailure), cause
        assert tx.status is Status.ROLLED_BACK
    finally:
        other.close()
    assert env.execute("SELECT doctor FROM oncall WHERE on_call") == [("alice",)]


def test_clock_check_can_be_configured(env: Env) -> None:
    with pytest.raises(ConfigurationError):
        env.config(max_clock_skew_seconds=-1)


def test_fence_uses_the_registered_transaction_timeout(env: Env) -> None:
    """The fence's transaction.timeout.ms is the coordinator's (registered at start-up),
    not a constant: a broker refuses a fence whose timeout exceeds its
    transaction.max.timeout.ms (900000 here), so registering one above it must make
    the fence fail -- and leave the gid in doubt, never decided."""
    gid, topic = crash_at(env, Step.AFTER_PREPARE, transaction_timeout_ms=5_000)
    assert env.execute("SELECT transaction_timeout_ms FROM pk2pc_decision_logs") == [(5_000,)]
    env.execute("UPDATE pk2pc_decision_logs SET transaction_timeout_ms = 900001")
    code, report, _ = recover_cli(env)
    assert code == 1 and report["remaining"] == [gid] and report["rolled_back"] == []
    assert "fencing" in report["remaining_reasons"][gid]
    env.execute("UPDATE pk2pc_decision_logs SET transaction_timeout_ms = 5000")
    code, report, stderr = recover_cli(env)
    assert code == 0, stderr
    assert report["rolled_back"] == [gid]
    assert rows(env) == [] and env.read(topic) == []


def test_the_decision_topic_is_not_a_produce_target(env: Env) -> None:
    coord = env.coordinator()
    with pytest.raises(UsageError, match="decision topic"), coord.transaction() as tx:
        tx.produce(env.decision_topic.name, key="forged", value=b"{}")
    assert env.decisions() == {}
