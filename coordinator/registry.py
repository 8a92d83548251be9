"""The decision-log registry: which decision log each coordinator writes to.

At start-up a coordinator records, in a small PostgreSQL table of the database
it prepares transactions in, the decision log its gids point at (the Kafka
cluster id, the topic's name and id, and their fingerprint, which every gid
carries). Recovery reads the table to know which topic to read for a gid, so
an operator does not have to pass ``--decision-topic`` (when given, it must
match), and it refuses any gid whose log it cannot identify.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import psycopg
import psycopg.errors
from psycopg import sql

from .decision_log import DecisionLog

__all__ = ["LogRegistry", "RegisteredLog"]

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class RegisteredLog:
    """One registered decision log (one row per log fingerprint and name)."""

    fingerprint: str
    name: str
    cluster_id: str
    topic: str
    topic_id: str
    transaction_timeout_ms: int
    registered_at: datetime


class LogRegistry:
    """The registry table (``schema.table``)."""

    def __init__(self, table: str, schema: str | None = None) -> None:
        self.ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)

    def create(self, conn: Connection) -> None:
        """Create the table when missing (``conn`` in autocommit mode); a
        concurrent creation by another coordinator is not an error."""
        try:
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " fingerprint text NOT NULL,"
                " name text NOT NULL,"
                " cluster_id text NOT NULL,"
                " topic text NOT NULL,"
                " topic_id text NOT NULL,"
                " transaction_timeout_ms integer NOT NULL,"
                " registered_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (fingerprint, name))").format(self.ident))
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            row = conn.execute("SELECT to_regclass(%s)",
                               (self.ident.as_string(conn),)).fetchone()
            if row is None or row[0] is None:
                raise

    def register(self, conn: Connection, log: DecisionLog, name: str,
                 transaction_timeout_ms: int) -> None:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (fingerprint, name, cluster_id, topic, topic_id,"
                " transaction_timeout_ms) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (fingerprint, name) DO UPDATE SET"
                " transaction_timeout_ms = EXCLUDED.transaction_timeout_ms"
            ).format(self.ident),
            (log.fingerprint, name, log.cluster_id, log.topic, log.topic_id,
             transaction_timeout_ms),
        )

    def lookup(self, conn: Connection, name: str,
               fingerprints: Collection[str]) -> dict[str, RegisteredLog]:
        """The registered logs among ``fingerprints`` (none when the table is missing)."""
        row = conn.execute("SELECT to_regclass(%s)", (self.ident.as_string(conn),)).fetchone()
        if row is None or row[0] is None:
            return {}
        rows = conn.execute(
            sql.SQL("SELECT fingerprint, name, cluster_id, topic, topic_id,"
                    " transaction_timeout_ms, registered_at FROM {}"
                    " WHERE name = %s AND fingerprint = ANY(%s)").format(self.ident),
            (name, list(fingerprints)),
        ).fetchall()
        return {
            str(r[0]): RegisteredLog(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                                     int(r[5]), r[6])  # type: ignore[call-overload, arg-type]
            for r in rows
        }
