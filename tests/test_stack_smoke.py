"""Smoke tests proving the services are real: Kafka transactions and PostgreSQL 2PC."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql

from tests.plugins.kafka_helpers import (
    read_committed,
    read_uncommitted,
    transactional_producer,
    values,
)

pytestmark = pytest.mark.integration


def test_kafka_commit_is_visible_abort_is_not(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("smoke")
    producer = transactional_producer(kafka_bootstrap)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"committed-1")
    producer.produce(topic, key=b"k", value=b"committed-2")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted-1")
    assert producer.flush(30) == 0  # the aborted record really reaches the log
    producer.abort_transaction(30)

    assert values(read_committed(kafka_bootstrap, topic)) == [b"committed-1", b"committed-2"]
    # A read_uncommitted consumer sees the aborted record: the abort was really written.
    assert values(read_uncommitted(kafka_bootstrap, topic)) == [
        b"committed-1", b"committed-2", b"aborted-1",
    ]


def _prepare(dsn: str, gid: str, row_id: int) -> None:
    """Insert a row in a transaction and PREPARE it; the session then ends."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO smoke (id) VALUES (%s)", (row_id,))
        conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))


def _prepared_gids(conn: psycopg.Connection[tuple[object, ...]], database: str) -> list[str]:
    rows = conn.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = %s ORDER BY gid", (database,)
    ).fetchall()
    return [str(gid) for (gid,) in rows]


def _ids(conn: psycopg.Connection[tuple[object, ...]]) -> list[object]:
    return [row[0] for row in conn.execute("SELECT id FROM smoke ORDER BY id").fetchall()]


def test_postgres_prepare_commit_and_rollback_prepared(pg_db: str) -> None:
    database = str(psycopg.conninfo.conninfo_to_dict(pg_db)["dbname"])
    with psycopg.connect(pg_db, autocommit=True) as conn:
        setting = conn.execute("SHOW max_prepared_transactions").fetchone()
        assert setting is not None and int(str(setting[0])) >= 64
        conn.execute("CREATE TABLE smoke (id int PRIMARY KEY)")

        _prepare(pg_db, "smoke-commit", 1)
        assert _prepared_gids(conn, database) == ["smoke-commit"]  # outlives its session
        assert _ids(conn) == []  # invisible while prepared
        conn.execute("COMMIT PREPARED 'smoke-commit'")
        assert _prepared_gids(conn, database) == []
        assert _ids(conn) == [1]

        _prepare(pg_db, "smoke-rollback", 2)
        assert _prepared_gids(conn, database) == ["smoke-rollback"]
        assert _ids(conn) == [1]
        conn.execute("ROLLBACK PREPARED 'smoke-rollback'")
        assert _prepared_gids(conn, database) == []
        assert _ids(conn) == [1]
