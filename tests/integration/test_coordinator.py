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
    PrepareForbidden,
    RolledBack,
    Status,
    UsageError,
)
from coordinator import _postgres as pg_adapter
from coordinator.gid import Gid, parse

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def test_happy_path_usage_from_the_issue(env: Env, orders: str) -> None:
    topic = env.topic()
    # Exactly the usage the issue requires (only the DSN, brokers, name and topic differ).
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
            pg_adapter.prepare(conn, gid)
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


def test_temporary_table_is_prepare_forbidden(
    env: Env, orders: str, group_commit: GroupCommit | None
) -> None:
    topic = env.topic()
    coord = env.coordinator(group_commit=group_commit)
    with pytest.raises(PrepareForbidden) as info, coord.transaction() as tx:
        tx.execute("CREATE TEMPORARY TABLE scratch (x int)")
        tx.execute("INSERT INTO scratch VALUES (1)")
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
    err = info.value
    assert isinstance(err, RolledBack)
    assert err.phase is Phase.PREPARE and err.gid == tx.gid
    assert "temporary" in str(err).lower()
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == [] and env.decisions() == {}


@pytest.mark.parametrize("statement", ["NOTIFY orders_changed", "LISTEN orders_changed",
                                       "SELECT pg_notify('orders_changed', 'x')"])
def test_listen_notify_is_prepare_forbidden(env: Env, orders: str, statement: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with pytest.raises(PrepareForbidden) as info, coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.execute(statement)
        tx.produce(topic, value=b"never")
    assert info.value.phase is Phase.PREPARE
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == [] and env.decisions() == {}


def test_one_phase_without_messages(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with coord.transaction(idempotency_key="pg-only") as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (7, 70)")
    assert tx.status is Status.COMMITTED
    assert tx.gid is None
    assert env.ids() == [7]
    assert env.idempotency_rows() == {"pg-only": None}
    assert env.prepared() == []
    assert env.decisions() == {}
    # The idempotency key is still enforced.
    from coordinator import AlreadyCommitted

    ran = False
    with pytest.raises(AlreadyCommitted) as info, coord.transaction(idempotency_key="pg-only"):
        ran = True
    assert not ran
    assert info.value.previous_gid is None
    assert info.value.idempotency_key == "pg-only"
    # ...also against an attempt that would publish.
    with pytest.raises(AlreadyCommitted), coord.transaction(idempotency_key="pg-only") as tx3:
        tx3.execute("INSERT INTO orders (id, total) VALUES (8, 80)")
        tx3.produce(topic, value=b"dup")
    assert env.ids() == [7]
    assert env.read(topic) == [] and env.decisions() == {}


def test_one_phase_commit_failing_rolls_back(env: Env, orders: str) -> None:
    env.execute("CREATE TABLE customers (id int PRIMARY KEY)")
    env.execute(
        "CREATE TABLE invoices (id int PRIMARY KEY, customer int NOT NULL "
        "REFERENCES customers DEFERRABLE INITIALLY DEFERRED)"
    )
    coord = env.coordinator()
    tx = coord.transaction(idempotency_key="inv-1")
    with pytest.raises(RolledBack) as info, tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.execute("INSERT INTO invoices (id, customer) VALUES (1, 999)")  # fails at COMMIT
    assert info.value.phase is Phase.PG_COMMIT
    assert info.value.gid is None
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.idempotency_rows() == {} and env.prepared() == []
    assert env.decisions() == {}


def test_produce_only_block_commits(env: Env) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with coord.transaction() as tx:
        tx.produce(topic, value=b"no SQL at all")
    assert tx.status is Status.COMMITTED and tx.gid is not None
    assert env.prepared() == []
    assert [m.value for m in env.read(topic)] == [b"no SQL at all"]
    env.assert_decided(tx.gid)


def test_empty_block_commits(env: Env) -> None:
    coord = env.coordinator()
    with coord.transaction() as tx:
        pass
    assert tx.status is Status.COMMITTED and tx.gid is None
    assert env.prepared() == []


def test_produce_outside_block_is_usage_error(env: Env, orders: str) -> None:
    topic = env.topic()
    coord = env.coordinator()
    tx = coord.transaction()
    with pytest.raises(UsageError):
        tx.produce(topic, value=b"before")
    with pytest.raises(UsageError):
        tx.execute("SELECT 1")
    with tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"inside")
    assert tx.status is Status.COMMITTED
    with pytest.raises(UsageError):
        tx.produce(topic, value=b"after")
    with pytest.raises(UsageError):
        _ = tx.connection
    with pytest.raises(UsageError), tx:  # a transaction is used once
        pass
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"inside"]
    assert tx.gid is not None and set(env.decisions()) == {tx.gid}


@pytest.mark.parametrize("how", ["commit", "rollback", "execute-commit"])
def test_ending_the_pg_transaction_in_block_is_usage_error(
    env: Env, orders: str, how: str
) -> None:
    topic = env.topic()
    coord = env.coordinator()
    with pytest.raises(UsageError) as info, coord.transaction() as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"never")
        if how == "commit":
            tx.connection.commit()
        elif how == "rollback":
            tx.connection.rollback()
        else:
            tx.execute("COMMIT")
    assert "NOT coordinated" in str(info.value)
    assert tx.status is Status.ROLLED_BACK
    # Nothing was published; what the block committed itself stays committed.
    assert env.read(topic) == [] and env.decisions() == {}
    assert env.ids() == ([] if how == "rollback" else [1])
    assert env.prepared() == []
    # The pooled connection came back clean.
    with coord.transaction() as tx2:
        tx2.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        tx2.produce(topic, value=b"next")
    assert tx2.status is Status.COMMITTED
    assert [m.value for m in env.read(topic)] == [b"next"]


def test_transaction_on_closed_coordinator_is_usage_error(env: Env) -> None:
    coord = env.coordinator()
    coord.close()
    with pytest.raises(UsageError), coord.transaction():
        pass


def test_bad_idempotency_key_is_usage_error(env: Env) -> None:
    coord = env.coordinator()
    for key in ("", "k" * 513):
        with pytest.raises(UsageError):
            coord.transaction(idempotency_key=key)
