"""The workload paths: one business operation (one INSERT and one 1 KB message, or the
INSERT alone for the PostgreSQL-only references) done a given way. The outbox path,
with its processes, is in ``outbox.py``.

``naive``      (a) commit PostgreSQL, then produce (idempotent, ``acks=all``) and wait
               for the delivery report. Unsafe: a crash between the two loses the message.
``outbox``     (b) transactional outbox, end to end (``outbox.py``).
``per_op``     (c) the coordinator, one Kafka transaction per operation.
``group``      (d) the coordinator with group commit.
``pg_2pc``     PostgreSQL alone: INSERT + PREPARE TRANSACTION + COMMIT PREPARED, the
               physical ceiling of (c) and (d) on the machine at hand.
``pg_commit``  reference, only with ``--paths``: PostgreSQL alone, INSERT + COMMIT.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer
from psycopg import sql
from psycopg_pool import ConnectionPool

from coordinator import Coordinator, CoordinatorConfig

from .env import COORD_NAME, PAYLOAD, REF_GID_PREFIX, Tables, make_pool
from .txn_count import TxnStats, counting_factory

__all__ = [
    "ALL_PATHS",
    "LABELS",
    "PATHS",
    "Naive",
    "Op",
    "PgOnly",
    "TwoPC",
    "Workload",
]

PATHS = ("naive", "outbox", "per_op", "group", "pg_2pc")
"""Measured by default."""
ALL_PATHS = (*PATHS, "pg_commit")
LABELS = {
    "naive": "(a) naive dual-write",
    "outbox": "(b) outbox + relay (end to end)",
    "per_op": "(c) 2PC, Kafka txn per op",
    "group": "(d) 2PC, group commit",
    "pg_2pc": "(ref) PostgreSQL only: INSERT + PREPARE + COMMIT PREPARED",
    "pg_commit": "(ref) PostgreSQL only: INSERT + COMMIT",
}

Op = tuple[str, float, float]
"""One completed operation: (op id, start, end), monotonic seconds."""


class Workload:
    """A path the closed loop drives: :meth:`op` from many threads at once."""

    name = ""

    def op(self, op_id: str) -> None:
        raise NotImplementedError

    def processes(self) -> dict[int, str]:
        """Child processes doing this path's work, pid -> label (for the CPU table)."""
        return {}

    def begin_measure(self) -> None:
        """Called before each measurement (warm-up included)."""

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> tuple[list[Op], dict[str, float]]:
        """After each measurement: the operations to count (a path may redefine when an
        operation completes) and extra figures for the notes."""
        return list(ops), {}

    def close(self) -> None:
        pass


class Naive(Workload):
    """(a) commit PostgreSQL, then produce (idempotent, acks=all) and wait for delivery."""

    name = "naive"

    def __init__(self, dsn: str, brokers: str, tables: Tables, topic: str, pool_size: int,
                 producer_conf: dict[str, Any]) -> None:
        self.pool = make_pool(dsn, pool_size, "bench-naive")
        self.tables = tables
        self.topic = topic
        self.producer = Producer({
            "bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
            **producer_conf,
        })
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="naive-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(self.tables.insert_row, (op_id, 1))
        done = threading.Event()
        errors: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            done.set()

        while True:
            try:
                self.producer.produce(self.topic, value=PAYLOAD, key=op_id.encode(),
                                      on_delivery=on_delivery)
                break
            except BufferError:
                time.sleep(0.001)
        if not done.wait(30):
            raise TimeoutError("no delivery report within 30 s")
        if errors:
            raise RuntimeError(f"delivery failed: {errors[0]}")

    def close(self) -> None:
        self.producer.flush(10)
        self._stop.set()
        self._poller.join()
        self.pool.close()


class TwoPC(Workload):
    """(c)/(d) the coordinator: one INSERT and one message in a coordinated transaction.

    Its producers count Kafka transactions and the decision records in them
    (``producer_factory``), for the mean group size."""

    def __init__(self, name: str, dsn: str, brokers: str, tables: Tables, topic: str,
                 pool_size: int, instance: str, config: CoordinatorConfig,
                 pool: ConnectionPool[Any] | None = None) -> None:
        self.name = name
        self.tables = tables
        self.topic = topic
        self.stats = TxnStats()
        self._before = (0, 0)
        config = dataclasses.replace(config, producer_factory=counting_factory(
            self.stats, config.decision_topic.name))
        self._owns_pool = pool is None
        self.pool = make_pool(dsn, pool_size, f"bench-{name}") if pool is None else pool
        self.coord = Coordinator(self.pool, {"bootstrap.servers": brokers}, COORD_NAME,
                                 instance=instance, config=config)
        self.coord.open()

    def op(self, op_id: str) -> None:
        with self.coord.transaction() as tx:
            tx.execute(self.tables.insert_row, (op_id, 1))
            tx.produce(self.topic, value=PAYLOAD, key=op_id.encode())

    def begin_measure(self) -> None:
        self._before = self.stats.snapshot()

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> tuple[list[Op], dict[str, float]]:
        after = self.stats.snapshot()
        txns = after[0] - self._before[0]
        extra: dict[str, float] = {}
        if txns:
            extra["kafka_txns_per_s"] = txns / (w1 - w0 + warmup)
            extra["mean_group_size"] = (after[1] - self._before[1]) / txns
        return list(ops), extra

    def close(self) -> None:
        self.coord.close()
        if self._owns_pool:
            self.pool.close()


class PgOnly(Workload):
    """The PostgreSQL side alone (no Kafka): 2PC (``pg_2pc``, what (c) and (d) cannot
    beat) or a plain COMMIT (``pg_commit``)."""

    def __init__(self, name: str, dsn: str, tables: Tables, pool_size: int) -> None:
        assert name in ("pg_2pc", "pg_commit")
        self.name = name
        self.tables = tables
        self.pool = make_pool(dsn, pool_size, f"bench-{name}")

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            if self.name == "pg_commit":
                conn.execute(self.tables.insert_row, (op_id, 1))
                return
            conn.autocommit = True
            gid = sql.Literal(REF_GID_PREFIX + op_id)
            conn.execute("BEGIN")
            conn.execute(self.tables.insert_row, (op_id, 1))
            conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(gid))
            conn.execute(sql.SQL("COMMIT PREPARED {}").format(gid))

    def close(self) -> None:
        self.pool.close()
