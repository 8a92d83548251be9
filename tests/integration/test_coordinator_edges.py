"""The coordinator's edges against the real PostgreSQL and Kafka: what PostgreSQL
cannot PREPARE, the one-phase shortcut, and misuse of the API. Every test checks
both sides."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from coordinator import (
    GroupCommit,
    OutcomeUnknown,
    Phase,
    PrepareForbidden,
    RolledBack,
    Status,
    UsageError,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


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


def test_one_phase_commit_losing_its_connection_is_in_doubt(env: Env, orders: str) -> None:
    """The server goes away before the one-phase COMMIT: from the client's side the
    COMMIT may or may not have happened, so the outcome is unknown, never guessed."""
    coord = env.coordinator()
    tx = coord.transaction()
    with pytest.raises(OutcomeUnknown) as info, tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        env.terminate(tx.connection.info.backend_pid)
    assert info.value.phase is Phase.PG_COMMIT
    assert tx.status is Status.IN_DOUBT
    assert env.prepared() == [] and env.decisions() == {}
    assert env.ids() == []  # it was in fact killed before the COMMIT reached it


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
