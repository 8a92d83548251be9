"""SQLAlchemy 2.x: a coordinator made from an engine, and ``tx.session``.

Runs against both coordinators: ``Coordinator(postgres=engine)`` and
``AsyncCoordinator(postgres=async_engine)`` (behind the suite's blocking view,
where an ``AsyncSession``'s coroutine methods become blocking calls). The model
is real: two mapped classes and a relationship, written through the ORM and
read back from PostgreSQL and Kafka.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from coordinator import ConfigurationError, RolledBack, Status, UsageError
from coordinator._enums import Phase
from tests.integration.conftest import Env
from tests.integration.orm import Customer, Order, url

BOTH_DRIVERS = True


def checked_out(env: Env, engine: Any) -> int:
    """Connections out of the engine's pool besides the one an open synchronous
    coordinator holds for its instance lock (the asyncio coordinator holds it on
    a connection of its own)."""
    pool = engine.pool if hasattr(engine, "pool") else engine.sync_engine.pool
    return int(pool.checkedout()) - (1 if env.driver == "sync" else 0)


def customers(env: Env) -> list[tuple[Any, ...]]:
    return env.execute("SELECT c.email, o.total FROM customers c JOIN orders o "
                       "ON o.customer_id = c.id ORDER BY o.total")


def test_orm_writes_commit_with_the_messages(env: Env, engine: Any) -> None:
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    with coord.transaction(idempotency_key="customer-1") as tx:
        customer = Customer(id=1, email="ada@example.com",
                            orders=[Order(id=10, total=5), Order(id=11, total=7)])
        tx.session.add(customer)  # not flushed by the block: the coordinator flushes
        tx.produce(topic, key=b"1", value=b"customer created")
    assert tx.status is Status.COMMITTED
    assert [o.total for o in customer.orders] == [5, 7]  # detached, still readable
    assert customers(env) == [("ada@example.com", 5), ("ada@example.com", 7)]
    assert [m.value for m in env.read(topic)] == [b"customer created"]
    assert env.prepared() == []
    assert checked_out(env, engine) == 0  # the engine's connection went back to its pool
    assert env.idempotency_rows() == {"customer-1": tx.gid}


def test_session_and_connection_are_one_transaction(env: Env, engine: Any) -> None:
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    with coord.transaction() as tx:
        tx.execute("INSERT INTO customers (id, email) VALUES (2, 'bo@example.com')")
        found = tx.session.scalars(select(Customer.email).where(Customer.id == 2)).all()
        assert list(found) == ["bo@example.com"]  # the session sees the raw insert
        tx.session.add(Order(id=20, customer_id=2, total=3))
        tx.produce(topic, value=b"x")
    assert tx.status is Status.COMMITTED
    assert customers(env) == [("bo@example.com", 3)]


def test_a_failing_flush_at_commit_rolls_everything_back(env: Env, engine: Any) -> None:
    env.execute("INSERT INTO customers (id, email) VALUES (1, 'taken@example.com')")
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    tx = coord.transaction()
    with pytest.raises(RolledBack) as caught, tx:
        tx.execute("INSERT INTO customers (id, email) VALUES (3, 'c@example.com')")
        tx.session.add(Customer(id=4, email="taken@example.com"))  # flushed at commit
        tx.produce(topic, value=b"never")
    assert caught.value.phase is Phase.EXECUTE
    assert isinstance(caught.value.__cause__, IntegrityError)
    assert tx.status is Status.ROLLED_BACK
    assert env.execute("SELECT id FROM customers ORDER BY id") == [(1,)]
    assert env.read(topic) == []
    assert env.prepared() == []
    assert checked_out(env, engine) == 0


def test_session_commit_inside_the_block_only_flushes(env: Env, engine: Any) -> None:
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    tx = coord.transaction()
    with pytest.raises(ValueError, match="business rule"), tx:
        tx.session.add(Customer(id=5, email="e@example.com"))
        tx.session.commit()  # joins the coordinator's transaction: no COMMIT
        assert tx.execute("SELECT count(*) FROM customers").fetchone() == (1,)
        tx.produce(topic, value=b"never")
        raise ValueError("business rule")
    assert tx.status is Status.ROLLED_BACK
    assert env.execute("SELECT id FROM customers") == []
    assert env.read(topic) == []
    # The pool's connection is clean: the next transaction commits normally.
    with coord.transaction() as again:
        again.session.add(Customer(id=6, email="f@example.com"))
        again.produce(topic, value=b"6")
    assert env.execute("SELECT id FROM customers") == [(6,)]
    assert checked_out(env, engine) == 0


def test_session_rollback_inside_the_block_is_reported(env: Env, engine: Any) -> None:
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    tx = coord.transaction()
    with pytest.raises(UsageError, match="ended the PostgreSQL transaction"), tx:
        tx.session.add(Customer(id=7, email="g@example.com"))
        tx.session.flush()
        tx.session.rollback()  # rolls back the coordinator's transaction
        tx.produce(topic, value=b"never")
    assert env.execute("SELECT id FROM customers") == []
    assert env.read(topic) == []
    assert checked_out(env, engine) == 0


def test_recover_own_on_an_engine_coordinator(env: Env, engine: Any) -> None:
    coord = env.coordinator(postgres=engine)
    report = env.recover_own(coord)
    assert report.ok and report.committed == [] and report.rolled_back == []
    assert checked_out(env, engine) == 0


def test_session_needs_an_engine(env: Env) -> None:
    coord = env.coordinator()
    with pytest.raises(UsageError, match="SQLAlchemy engine"), coord.transaction() as tx:
        tx.session  # noqa: B018


def test_engines_of_the_wrong_kind_are_refused(env: Env) -> None:
    sqlite = create_engine("sqlite://")
    other = (create_async_engine(url(env)) if env.driver == "sync"
             else create_engine(url(env)))
    for wrong, message in ((sqlite, "psycopg"), (other, "engine needs")):
        with pytest.raises(ConfigurationError, match=message):
            env.new_coordinator(postgres=wrong)
    sqlite.dispose()
