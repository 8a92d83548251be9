"""What a benchmark run needs around it: the services, its tables and topics, pools,
and the clean-up of what an interrupted run leaves prepared."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from coordinator.gid import GID_PREFIX
from tests.plugins.kafka_helpers import create_topic, delete_topics

__all__ = [
    "COORD_NAME",
    "DEFAULT_OUT",
    "PAYLOAD",
    "QUICK_OUT",
    "REF_GID_PREFIX",
    "Services",
    "Tables",
    "create_topics",
    "delete_topics",
    "make_pool",
    "rollback_own_prepared",
    "say",
]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs"
QUICK_OUT = ROOT / "bench-results"
PAYLOAD = bytes(range(256)) * 4  # 1 KB
COORD_NAME = "bench"
REF_GID_PREFIX = f"pk2pc-bench-ref-{os.getpid()}-"
"""The gids of the PostgreSQL-only 2PC reference path of this process."""


@dataclass(frozen=True)
class Services:
    """PostgreSQL and Kafka, from ``PG_DSN`` and ``KAFKA_BOOTSTRAP_SERVERS``."""

    dsn: str
    brokers: str
    pg_port: int
    kafka_port: int

    @classmethod
    def from_env(cls) -> Services:
        dsn = os.environ.get("PG_DSN")
        brokers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not dsn or not brokers:
            sys.exit("set PG_DSN and KAFKA_BOOTSTRAP_SERVERS (scripts/bench does it: "
                     "eval \"$(scripts/stack env)\")")
        pg_port = int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)
        kafka_port = int(brokers.split(",")[0].rsplit(":", 1)[1])
        return cls(dsn, brokers, pg_port, kafka_port)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def create_topics(brokers: str, names: Sequence[str], partitions: int) -> None:
    for name in names:
        create_topic(brokers, name, partitions=partitions, replication_factor=1)


class Tables:
    """The business table and the outbox table of one bench invocation."""

    def __init__(self, dsn: str, suffix: str) -> None:
        self.dsn = dsn
        self.rows = f"pk2pc_bench_rows_{suffix}"
        self.outbox = f"pk2pc_bench_outbox_{suffix}"
        self.insert_row = sql.SQL("INSERT INTO {} (op_id, amount) VALUES (%s, %s)").format(
            sql.Identifier(self.rows))
        self.insert_outbox = sql.SQL(
            "INSERT INTO {} (op_id, topic, payload) VALUES (%s, %s, %s)").format(
            sql.Identifier(self.outbox))

    def create(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (op_id text PRIMARY KEY, amount int NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())").format(
                sql.Identifier(self.rows)))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, op_id text NOT NULL, "
                "topic text NOT NULL, payload bytea NOT NULL)").format(
                sql.Identifier(self.outbox)))

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for t in (self.rows, self.outbox):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


def make_pool(dsn: str, size: int, name: str) -> ConnectionPool[Any]:
    pool: ConnectionPool[Any] = ConnectionPool(
        dsn, min_size=size, max_size=size, open=False, name=name, timeout=60)
    pool.open(wait=True, timeout=60)
    return pool


def rollback_own_prepared(dsn: str, instances: Sequence[str]) -> int:
    """Roll back prepared transactions left by this invocation (only after errors)."""
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
        for (gid,) in rows:
            ours = any(str(gid).startswith(f"{GID_PREFIX}:{COORD_NAME}:{i}:") for i in instances)
            if ours or str(gid).startswith(REF_GID_PREFIX):
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
                    n += 1
    return n
