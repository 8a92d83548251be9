"""The coordinator against the real PostgreSQL and Kafka: every test checks both
sides -- the rows PostgreSQL holds and what a read_committed consumer reads --
and the decision log."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import psycopg
import psycopg.errors
import pytest

from coordinator import (
    GroupCommit,
    Phase,
    RolledBack,
    Status,
)
from coordinator import _postgres as pg_adapter
from coordinator._effects import run_on
from coordinator.gid import Gid, parse

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


def test_happy_path_usage(env: Env, orders: str) -> None:
    topic = env.topic()
    # Exactly the README's usage (only the DSN, brokers, name and topic differ).
    from coordinator import Coordinator, Status

    with Coordinator(
        postgres=env.dsn,
        kafka={"bootstrap.servers": env.bootstrap},
        name=env.name,
    ) as coord:
        with coord.transaction(idempotency_key="order-42") as tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (42, 10))
            tx.produce(topic, value=b'{"id": 42}', key=b"42", headers={"type": "created"})
            assert isinstance(tx.connection, psycopg.Connection)
        assert tx.status is Status.COMMITTED
        print(tx.gid)

    assert tx.gid is not None
    gid = parse(tx.gid)
    assert gid.name == env.name
    # PostgreSQL: the row, the idempotency key with its gid, nothing left prepared.
    assert env.execute("SELECT id, total FROM orders") == [(42, 10)]
    assert env.idempotency_rows() == {"order-42": tx.gid}
    assert env.prepared() == []
    # Kafka: the message, once, as produced.
    [msg] = env.read(topic)
    assert (msg.key, msg.value) == (b"42", b'{"id": 42}')
    assert msg.headers == (("type", b"created"),)
    # The decision log (the default topic here) has the gid, in the partition it names.
    env.assert_decided(tx.gid, topic="pk2pc.decisions")


def test_many_messages_topics_and_partitions(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> None:
    a = env.topic(partitions=3)
    b = env.topic()
    coord = env.coordinator(group_commit=group_commit)
    with coord.transaction() as tx:
        for i in range(10):
            tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (i, i * 10))
            tx.produce(a, value=json.dumps({"id": i}), key=str(i), partition=i % 3,
                       headers=[("n", str(i)), ("n", b"again")])
        tx.produce(b, value=None, key=b"tombstone")
    assert tx.status is Status.COMMITTED
    assert env.ids() == list(range(10))
    got = env.read(a)
    assert sorted(json.loads(m.value or b"")["id"] for m in got) == list(range(10))
    for m in got:
        i = int(m.key or b"")
        assert m.partition == i % 3
        assert m.headers == (("n", str(i).encode()), ("n", b"again"))
    [tomb] = env.read(b)
    assert tomb.key == b"tombstone" and tomb.value is None
    assert tx.gid is not None
    env.assert_decided(tx.gid)
    assert env.prepared() == []


def test_sequential_transactions_reuse_producers(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator(producers=2)
    gids = []
    for i in range(12):
        with coord.transaction() as tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (%s, 1)", (i,))
            tx.produce(topic, value=str(i))
        assert tx.status is Status.COMMITTED
        assert tx.gid is not None
        gids.append(tx.gid)
    assert len(set(gids)) == 12
    assert {parse(g).slot for g in gids} <= {0, 1}
    assert {parse(g).transactional_id for g in gids} <= set(coord.transactional_ids)
    assert env.ids() == list(range(12))
    assert sorted(int(m.value or b"") for m in env.read(topic)) == list(range(12))
    assert set(env.decisions()) == set(gids)


class Boom(Exception):
    pass


def test_block_exception_propagates_unchanged(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    boom = Boom("business rule says no")
    with pytest.raises(Boom) as info, coord.transaction(idempotency_key="k-1") as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
        raise boom
    assert info.value is boom
    assert tx.status is Status.ROLLED_BACK
    assert tx.gid is None
    assert env.ids() == []
    assert env.idempotency_rows() == {}
    assert env.prepared() == []
    assert env.read(topic) == []
    assert env.decisions() == {}
    # The key was not consumed: the same operation can run again and commit.
    with coord.transaction(idempotency_key="k-1") as tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx2.produce(topic, value=b"now")
    assert tx2.status is Status.COMMITTED
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"now"]
    assert tx2.gid is not None and set(env.decisions()) == {tx2.gid}


def test_base_exception_in_block_rolls_back(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with pytest.raises(KeyboardInterrupt), coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
        raise KeyboardInterrupt
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == [] and env.decisions() == {}


def test_deferred_constraint_fails_at_prepare(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> None:
    env.execute("CREATE TABLE customers (id int PRIMARY KEY)")
    env.execute(
        "CREATE TABLE invoices (id int PRIMARY KEY, customer int NOT NULL "
        "REFERENCES customers DEFERRABLE INITIALLY DEFERRED)"
    )
    topic = env.topic()
    coord = env.coordinator(group_commit=group_commit)
    with pytest.raises(RolledBack) as info, coord.transaction(idempotency_key="inv-1") as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.execute("INSERT INTO invoices (id, customer) VALUES (1, 999)")  # checked at PREPARE
        tx.produce(topic, value=b"invoice 1")
    err = info.value
    assert type(err) is RolledBack
    assert err.phase is Phase.PREPARE
    assert err.gid is not None and err.gid == tx.gid
    assert "foreign key" in str(err)
    assert isinstance(err.__cause__, psycopg.errors.ForeignKeyViolation)
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.execute("SELECT * FROM invoices") == []
    assert env.idempotency_rows() == {}
    assert env.prepared() == []
    assert env.read(topic) == []
    assert err.gid not in env.decisions()
    # The producer slot was given back: the next transaction commits.
    with coord.transaction() as tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        tx2.produce(topic, value=b"ok")
    assert tx2.status is Status.COMMITTED
    assert [m.value for m in env.read(topic)] == [b"ok"]


def test_statement_error_caught_inside_block_rolls_back(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with pytest.raises(RolledBack) as info, coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
        # The user swallows the error; the transaction is still failed.
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 2)")  # duplicate key
    assert info.value.phase is Phase.EXECUTE
    assert "rolled back" in str(info.value)
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == [] and env.decisions() == {}


def test_prepare_on_failed_transaction_is_not_taken_for_success(env: Env) -> None:
    """PREPARE TRANSACTION on a failed transaction answers ROLLBACK: the adapter
    checks the command status (or the round trip fails earlier, at the xid query)
    and refuses to go on."""
    gid = str(Gid.new("x", "y", 0, 0, 0, "0" * 12))
    with psycopg.connect(env.dsn) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises((pg_adapter.NotPrepared, psycopg.errors.InFailedSqlTransaction)):
            run_on(conn, pg_adapter.prepare(gid))
    assert env.prepared() == []


def test_savepoint_error_recovered_inside_block_commits(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        try:
            with tx.connection.transaction():  # a savepoint
                tx.execute("INSERT INTO orders (id, total) VALUES (1, 2)")
        except psycopg.errors.UniqueViolation:
            pass
        tx.produce(topic, value=b"1")
    assert tx.status is Status.COMMITTED
    assert env.execute("SELECT id, total FROM orders") == [(1, 1)]
    assert [m.value for m in env.read(topic)] == [b"1"]


@pytest.mark.parametrize("size", [5000, 2_000_000], ids=["broker-limit", "client-limit"])
def test_message_too_large_rolls_back(
    env: Env, orders: str, size: int, group_commit: GroupCommit | None
) -> None:
    # 5000 bytes: the broker refuses it (topic max.message.bytes=1000); 2 MB: the client
    # refuses it already in produce() (librdkafka's message.max.bytes, 1 MB by default).
    topic = env.topic(config={"max.message.bytes": "1000"})
    # One producer: the next transaction runs on the producer that saw the failure.
    coord = env.coordinator(group_commit=group_commit, producers=1)
    tx = coord.transaction(idempotency_key="big")
    with pytest.raises(RolledBack) as info, tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"small")
        tx.produce(topic, value=b"x" * size)
    err = info.value
    assert err.phase is Phase.PRODUCE
    assert err.gid is not None and err.complete
    assert "MSG_SIZE_TOO_LARGE" in str(err)
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.idempotency_rows() == {}
    assert env.prepared() == []
    assert env.read(topic) == []
    assert env.decisions() == {}
    # The coordinator still works afterwards: the next transaction on the same slot must
    # not inherit the failed one's producer state (librdkafka would fail it with
    # OUT_OF_ORDER_SEQUENCE_NUMBER / _PURGE_QUEUE if the producer were reused).
    with coord.transaction(idempotency_key="big") as tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx2.produce(topic, value=b"small")
    assert tx2.status is Status.COMMITTED
    assert [m.value for m in env.read(topic)] == [b"small"]
    assert tx2.gid is not None and set(env.decisions()) == {tx2.gid}


@pytest.mark.parametrize("check_topics", [True, False], ids=["checked", "unchecked"])
def test_missing_topic_rolls_back(
    env: Env, orders: str, check_topics: bool, group_commit: GroupCommit | None
) -> None:
    good = env.topic()
    missing = f"missing.{env.name}"
    # Without the check, librdkafka waits for the topic's metadata until the delivery
    # fails or the flush times out: keep that short.
    coord = env.coordinator(group_commit=group_commit, check_topics=check_topics,
                            kafka_timeout=5.0, producer_overrides={"message.timeout.ms": 4000})
    with pytest.raises(RolledBack) as info, coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(good, value=b"good")
        tx.produce(missing, value=b"nowhere")
    err = info.value
    assert tx.status is Status.ROLLED_BACK
    assert err.phase is Phase.PRODUCE
    if check_topics:
        assert missing in str(err)
        assert tx.gid is None  # refused before PREPARE
    assert env.ids() == [] and env.prepared() == []
    assert env.read(good) == []
    assert env.decisions() == {}
    assert not env.topic_exists(missing)  # auto-creation is off
    # Still usable.
    with coord.transaction() as tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        tx2.produce(good, value=b"after")
    assert tx2.status is Status.COMMITTED
    assert env.ids() == [2]
    assert [m.value for m in env.read(good)] == [b"after"]
