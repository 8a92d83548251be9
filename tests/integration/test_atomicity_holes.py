"""Safety never depends on timing or on the operator getting a flag right.

End-to-end reproductions against the real stack of two divergences found in review,
and the checks that close their relatives:

* a coordinator frozen (SIGSTOP) right after PREPARE while its slot's producer had to
  be re-created, with recovery run at ``--grace-seconds 0`` meanwhile: it must not
  commit in Kafka what recovery rolled back, nor tell its caller COMMITTED;
* recovery pointed at the wrong decision log (another topic, the topic deleted and
  re-created, records deleted under it) must refuse, never roll back committed work;
* a coordinator host whose clock runs 10 minutes behind (libfaketime): recovery
  must still find its decisions (the search trusts offsets, not timestamps);
* a serialization failure at COMMIT is a rollback, not an unknown outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

import recovery
from coordinator import (
    ConfigurationError,
    DecisionTopic,
    Error,
    GroupCommit,
    OutcomeUnknown,
    RolledBack,
    Status,
    Step,
)
from coordinator.gid import parse
from recovery import RecoveryConfig
from tests.plugins.kafka_helpers import create_topic

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]


class Crash(BaseException):
    """Stands for the process dying at a step (raised from an on_step hook)."""


def make_table(env: Env) -> str:
    env.execute("CREATE TABLE ops (op_id text PRIMARY KEY)")
    return "ops"


def rows(env: Env) -> list[str]:
    return [r[0] for r in env.execute("SELECT op_id FROM ops ORDER BY op_id")]


def recover_cli(env: Env, *extra: str, bootstrap: str | None = None
                ) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "recovery", "--postgres", env.dsn, "--bootstrap-servers",
         bootstrap or env.bootstrap, "--name", env.name, "--grace-seconds", "0", "--json",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


# -- 1. a paused coordinator and a producer re-created after recovery's fence ---------


def one_op(env: Env, topic: str, at: str, *extra: str, faketime: str | None = None
           ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.crash.one_op", "--postgres", env.dsn, "--bootstrap",
           env.bootstrap, "--name", env.name, "--instance", env.instance, "--topic", topic,
           "--table", "ops", "--decision-topic", env.decision_topic.name, "--at", at, *extra]
    envvars = dict(os.environ)
    if faketime is not None:
        cmd = ["faketime", "-f", faketime, *cmd]
        envvars["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=envvars)


def next_event(proc: subprocess.Popen[str], timeout: float = 90.0) -> dict[str, Any]:
    assert proc.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()  # type: ignore[union-attr]
                                                        ), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no event from the process within {timeout}s"
    event: dict[str, Any] = json.loads(box[0])
    return event


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(30)
        if p.stdout is not None:
            p.stdout.close()


@pytest.mark.parametrize("oversize_first", [True, False], ids=["producer-recreated", "plain"])
def test_sigstopped_after_prepare_then_recovery_grace_zero(
        env: Env, procs: list[subprocess.Popen[str]], oversize_first: bool) -> None:
    make_table(env)
    topic = env.topic()
    proc = one_op(env, topic, "after_prepare:stop",
                  *(["--oversize-first"] if oversize_first else []))
    procs.append(proc)
    assert next_event(proc)["event"] == "open"
    if oversize_first:
        assert next_event(proc)["told"] == Status.ROLLED_BACK.value
    stopped = next_event(proc)
    assert stopped["event"] == "step"
    gid = stopped["gid"]
    assert env.prepared() == [gid]

    # The coordinator is frozen past every grace period: recovery fences and rolls back.
    code, report, stderr = recover_cli(env)
    assert code == 0, stderr
    assert report["rolled_back"] == [gid]
    assert env.prepared() == []

    os.kill(proc.pid, signal.SIGCONT)
    result = next_event(proc)
    assert proc.wait(60) == 0
    assert result["told"] != "committed", result
    assert result["error"] in ("RolledBack", "OutcomeUnknown"), result
    # Both sides rolled back.
    assert rows(env) == []
    assert env.read(topic) == []
    assert gid not in env.decisions()


def test_paused_in_process_group_commit_never_told_committed_when_rolled_back(
        env: Env) -> None:
    """Group commit, four threads on one producer slot, recovery at grace 0 while one
    transaction is held right after PREPARE; every answer must match both sides."""
    make_table(env)
    topic = env.topic()
    hold = threading.Event()
    held: list[str] = []

    def on_step(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE and threading.current_thread().name == "t0":
            assert gid is not None
            held.append(gid)
            hold.wait(60)

    coord = env.coordinator(producers=1, group_commit=GroupCommit(max_wait=0.005),
                            on_step=on_step)
    told: dict[str, tuple[str, str | None]] = {}

    def work(i: int) -> None:
        for k in range(5):
            op = f"t{i}-{k}"
            tx = coord.transaction()
            try:
                with tx:
                    tx.execute("INSERT INTO ops (op_id) VALUES (%s)", (op,))
                    tx.produce(topic, key=op, value=op)
            except Error:
                pass
            told[op] = (tx.status.value, tx.gid)

    threads = [threading.Thread(target=work, args=(i,), name=f"t{i}") for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held
    for _ in range(3):  # a recovery storm while t0 is frozen after PREPARE
        recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))
    hold.set()
    for t in threads:
        t.join(120)
    recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))
    visible = {r.key.decode() for r in env.read(topic) if r.key is not None}
    committed_rows = set(rows(env))
    assert visible == committed_rows
    for op, (status, _gid) in told.items():
        assert (status == Status.COMMITTED.value) == (op in committed_rows), (op, status)
    assert told["t0-0"][0] != Status.COMMITTED.value
    assert env.prepared() == []


# -- 2. recovery pointed at the wrong decision log ---------------------------------------


def committed_in_kafka_then_dead(env: Env) -> tuple[str, str]:
    """A transaction whose Kafka commit passed and whose process "died" before COMMIT
    PREPARED (its coordinator is closed: no producer of it is alive)."""
    make_table(env)
    topic = env.topic()

    def on_step(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_KAFKA_COMMIT:
            raise Crash(gid)

    coord = env.coordinator(on_step=on_step)
    tx = coord.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('a')")
        tx.produce(topic, key="a", value=b"a")
    assert tx.gid is not None
    env.close()
    assert env.prepared() == [tx.gid]
    assert [r.value for r in env.read(topic)] == [b"a"]
    return tx.gid, topic


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


# -- 5. clock skew -----------------------------------------------------------------------


needs_faketime = pytest.mark.skipif(shutil.which("faketime") is None,
                                    reason="libfaketime (Debian package faketime) missing")


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
    make_table(env)
    topic = env.topic()

    def on_step(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_KAFKA_COMMIT:
            raise Crash(gid)

    coord = env.coordinator(on_step=on_step, producer_factory=ClockBehindProducer)
    tx = coord.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('a')")
        tx.produce(topic, key="a", value=b"a")
    env.close()
    gid = tx.gid
    assert gid is not None and env.prepared() == [gid]
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


# -- 7. class 40 at COMMIT ---------------------------------------------------------------


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


# -- 8. recovery liveness ----------------------------------------------------------------


def test_fence_uses_the_registered_transaction_timeout(env: Env) -> None:
    """The fence's transaction.timeout.ms is the coordinator's (registered at start-up),
    not a constant: a broker refuses a fence whose timeout exceeds its
    transaction.max.timeout.ms (900000 here), so registering one above it must make
    the fence fail -- and leave the gid in doubt, never decided."""
    make_table(env)
    topic = env.topic()

    def on_step(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE:
            raise Crash(gid)

    coord = env.coordinator(on_step=on_step, transaction_timeout_ms=5_000)
    tx = coord.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('a')")
        tx.produce(topic, key="a", value=b"a")
    env.close()
    gid = tx.gid
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


# -- found in review ---------------------------------------------------------------------


def test_recover_own_never_touches_the_live_coordinators_transactions(env: Env) -> None:
    """recover_own skips grace and fence only for the gids the coordinator found
    prepared when it opened (a set, not a time: a clock step on the PostgreSQL host
    cannot make a live transaction look inherited)."""
    make_table(env)
    topic = env.topic()

    def crash_after_prepare(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE:
            raise Crash(gid)

    old = env.coordinator(on_step=crash_after_prepare)
    tx = old.transaction()
    with pytest.raises(Crash), tx:
        tx.execute("INSERT INTO ops (op_id) VALUES ('old')")
        tx.produce(topic, key="old", value=b"old")
    env.close()
    inherited = tx.gid

    hold, held = threading.Event(), threading.Event()

    def pause_after_prepare(step: Step, gid: str | None) -> None:
        if step is Step.AFTER_PREPARE:
            held.set()
            hold.wait(60)

    coord = env.coordinator(on_step=pause_after_prepare)
    assert coord.inherited_gids == {inherited}
    live = coord.transaction()

    def run_live() -> None:
        with live:
            live.execute("INSERT INTO ops (op_id) VALUES ('live')")
            live.produce(topic, key="live", value=b"live")

    t = threading.Thread(target=run_live)
    t.start()
    assert held.wait(60)
    report = recovery.recover_own(coord, env.kafka)
    assert report.rolled_back == [inherited]
    assert report.waiting == [live.gid] and report.fenced == []
    hold.set()
    t.join(60)
    assert live.status is Status.COMMITTED
    assert rows(env) == ["live"]
    assert [r.value for r in env.read(topic)] == [b"live"]


def test_the_decision_topic_is_not_a_produce_target(env: Env) -> None:
    from coordinator import UsageError

    coord = env.coordinator()
    with pytest.raises(UsageError, match="decision topic"), coord.transaction() as tx:
        tx.produce(env.decision_topic.name, key="forged", value=b"{}")
    assert env.decisions() == {}
