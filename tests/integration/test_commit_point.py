"""After the commit point: PostgreSQL lost right after the Kafka commit.

The Kafka commit is the commit point. When the transaction's PostgreSQL
connection dies right after it, the coordinator finishes ``COMMIT PREPARED`` on
a new connection; when PostgreSQL stays unreachable, it raises
``CommittedPendingRecovery`` (the transaction *is* committed) and leaves the
prepared transaction to recovery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg
import pytest
import tenacity
from psycopg import sql

from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    GroupCommit,
    IdempotencyKeyBusy,
    Phase,
    RetryPolicy,
    Status,
    Step,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.faults]


BOTH_DRIVERS = True  # each env test runs with Coordinator and with AsyncCoordinator


class AfterKafkaCommit:
    """An ``on_step`` hook: runs ``action`` when a transaction has passed the commit point
    (the Kafka commit returned COMMITTED) and before its COMMIT PREPARED, while
    :attr:`armed`. :attr:`fired` lists the gids it ran for."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.armed = True
        self.fired: list[str | None] = []

    def __call__(self, step: Step, gid: str | None) -> None:
        if self.armed and step is Step.AFTER_KAFKA_COMMIT:
            self.fired.append(gid)
            self.action()


def test_connection_killed_after_kafka_commit_is_finished_on_new_connection(
    env: Env, orders: str, caplog: pytest.LogCaptureFixture, group_commit: GroupCommit | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="coordinator")
    topic = env.topic()
    pids: list[int] = []
    hook = AfterKafkaCommit(lambda: env.terminate(pids[-1]))
    coord = env.coordinator(group_commit=group_commit, on_step=hook)

    with coord.transaction(idempotency_key="order-1") as tx:
        pids.append(tx.connection.info.backend_pid)
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 10)")
        tx.produce(topic, value=b"order 1")

    assert hook.fired == [tx.gid]
    assert tx.status is Status.COMMITTED
    # It really went through the retry on a new connection.
    assert any("retrying COMMIT PREPARED" in r.getMessage() and str(tx.gid) in r.getMessage()
               for r in caplog.records), caplog.text
    # The backend that prepared is gone, yet PostgreSQL committed.
    assert env.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                       (pids[0],)) == [(0,)]
    assert env.ids() == [1]
    assert env.idempotency_rows() == {"order-1": tx.gid}
    assert env.prepared() == []
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    assert tx.gid is not None
    env.assert_decided(tx.gid)

    # The broken connection was not handed out again: the coordinator keeps working.
    hook.armed = False
    for i in (2, 3, 4):
        with coord.transaction() as tx2:
            tx2.execute("INSERT INTO orders (id, total) VALUES (%s, 10)", (i,))
            tx2.produce(topic, value=f"order {i}")
        assert tx2.status is Status.COMMITTED
    assert env.ids() == [1, 2, 3, 4]
    assert sorted(m.value or b"" for m in env.read(topic)) == [b"order 1", b"order 2", b"order 3",
                                                        b"order 4"]


def test_postgres_unreachable_after_kafka_commit_raises_committed_pending_recovery(
    env: Env, orders: str, caplog: pytest.LogCaptureFixture, group_commit: GroupCommit | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="coordinator")
    topic = env.topic()
    hook = AfterKafkaCommit(env.block_connections)
    coord = env.coordinator(
        group_commit=group_commit,
        pg_commit_retry=RetryPolicy(stop=tenacity.stop_after_attempt(2),
                                    wait=tenacity.wait_none()),
        connection_timeout=3.0,
        idempotency_wait_ms=500,
        on_step=hook,
    )

    with pytest.raises(CommittedPendingRecovery) as info, \
            coord.transaction(idempotency_key="order-1") as tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 10)")
        tx.produce(topic, value=b"order 1")

    err = info.value
    assert hook.fired == [tx.gid]
    assert err.gid is not None and err.gid == tx.gid
    assert err.phase is Phase.PG_COMMIT
    assert "is committed" in str(err) and "recovery" in str(err)
    assert tx.status is Status.DECIDED
    # Every log line about it names the gid.
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("coordinator")]
    assert errors and all(err.gid in line for line in errors), errors
    # Kafka: the commit point passed -- messages and decision record are visible.
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    env.assert_decided(err.gid)
    # PostgreSQL: still prepared, waiting for recovery.
    assert env.prepared() == [err.gid]
    hook.armed = False

    # PostgreSQL is back, recovery has not run yet: a client retry with the same key
    # must not apply or publish the operation twice; the prepared transaction holds it.
    env.allow_connections()
    assert env.ids() == []
    retry = coord.transaction(idempotency_key="order-1")
    with pytest.raises(IdempotencyKeyBusy), retry:
        retry.execute("INSERT INTO orders (id, total) VALUES (1, 10)")
        retry.produce(topic, value=b"order 1 again")

    # What recovery will do: commit the prepared transaction.
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(err.gid)))
    assert env.ids() == [1]
    assert env.idempotency_rows() == {"order-1": err.gid}
    assert env.prepared() == []
    # Now the retry is told it already committed; still one row, one message.
    with pytest.raises(AlreadyCommitted) as again, coord.transaction(idempotency_key="order-1"):
        pass
    assert again.value.previous_gid == err.gid
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"order 1"]
    assert set(env.decisions()) == {err.gid}
