"""(b) The transactional outbox, measured end to end.

The business transaction also inserts an outbox row. A relay process polls
``SELECT ... FOR UPDATE SKIP LOCKED LIMIT n``, publishes the rows in one Kafka
transaction and deletes them after the Kafka commit. An operation completes when a
``read_committed`` consumer (another process) receives its message.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg import sql

from .env import PAYLOAD, Tables, make_pool
from .paths import Op, Workload

__all__ = ["Outbox"]


def relay_main(dsn: str, brokers: str, outbox: str, active: Any, stop: Any, batch: int,
               poll_s: float, counters: Any) -> None:
    """The outbox relay: poll, publish in one Kafka transaction, delete after the commit."""
    producer = Producer({
        "bootstrap.servers": brokers, "transactional.id": f"pk2pc-bench-relay-{uuid.uuid4()}",
        "enable.idempotence": True, "acks": "all", "linger.ms": 1,
    })
    producer.init_transactions(30)
    select = sql.SQL(
        "SELECT id, op_id, topic, payload FROM {} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    ).format(sql.Identifier(outbox))
    delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(sql.Identifier(outbox))
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            if not active.is_set():
                active.wait(0.1)
                continue
            with conn.transaction():
                rows = conn.execute(select, (batch,)).fetchall()
                if rows:
                    producer.begin_transaction()
                    for _id, op_id, topic, payload in rows:
                        while True:
                            try:
                                producer.produce(topic, value=bytes(payload), key=op_id.encode())
                                break
                            except BufferError:
                                producer.poll(0.01)
                    producer.commit_transaction(30)
                    conn.execute(delete, ([r[0] for r in rows],))
            if rows:
                with counters.get_lock():
                    counters[0] += len(rows)
                    counters[1] += 1
            else:
                time.sleep(poll_s)
    producer.flush(5)


def consumer_main(brokers: str, topic: str, partitions: int, stop: Any, pipe: Any) -> None:
    """A read_committed consumer recording when each operation's message arrives."""
    consumer = Consumer({
        "bootstrap.servers": brokers, "group.id": f"pk2pc-bench-{uuid.uuid4()}",
        "isolation.level": "read_committed", "enable.auto.commit": False,
        "fetch.wait.max.ms": 10, "enable.partition.eof": False,
    })
    consumer.assign([TopicPartition(topic, p, -2) for p in range(partitions)])  # beginning
    buf: list[tuple[str, float]] = []
    pipe.send("ready")
    try:
        while not stop.is_set():
            if pipe.poll():
                pipe.recv()
                pipe.send(buf)
                buf = []
            msg = consumer.poll(0.01)
            if msg is None:
                continue
            now = time.monotonic()
            msgs = [msg, *consumer.consume(1000, 0)]
            for m in msgs:
                key = m.key()
                if m.error() is None and key is not None:
                    buf.append((key.decode() if isinstance(key, bytes) else key, now))
    finally:
        consumer.close()


class Outbox(Workload):
    """(b) the outbox row in the business transaction; the relay publishes later.

    Create it before any thread is started: it spawns its two processes."""

    name = "outbox"

    def __init__(self, dsn: str, brokers: str, tables: Tables, topic: str, partitions: int,
                 pool_size: int, batch: int, poll_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.tables = tables
        self.topic = topic
        self.active = ctx.Event()
        self.stop = ctx.Event()
        self.counters = ctx.Array("q", 2)  # rows relayed, Kafka transactions
        self.relay = ctx.Process(
            target=relay_main, name="outbox-relay",
            args=(dsn, brokers, tables.outbox, self.active, self.stop, batch, poll_s,
                  self.counters))
        self.pipe, child = ctx.Pipe()
        self.consumer = ctx.Process(
            target=consumer_main, name="outbox-consumer",
            args=(brokers, topic, partitions, self.stop, child))
        self.relay.start()
        self.consumer.start()
        if not self.pipe.poll(60):
            raise RuntimeError("the outbox consumer did not start")
        self.pipe.recv()
        self.pool = make_pool(dsn, pool_size, "bench-outbox")
        self._relay0 = (0, 0)

    def processes(self) -> dict[int, str]:
        return {self.relay.pid or 0: "outbox relay", self.consumer.pid or 0: "outbox consumer"}

    def op(self, op_id: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(self.tables.insert_row, (op_id, 1))
            conn.execute(self.tables.insert_outbox, (op_id, self.topic, PAYLOAD))

    def arrivals(self) -> list[tuple[str, float]]:
        self.pipe.send("collect")
        got: list[tuple[str, float]] = self.pipe.recv()
        return got

    def _relayed(self) -> tuple[int, int]:
        with self.counters.get_lock():
            return self.counters[0], self.counters[1]

    def begin_measure(self) -> None:
        self.arrivals()  # discard leftovers
        self._relay0 = self._relayed()
        self.active.set()

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> tuple[list[Op], dict[str, float]]:
        """Wait until every committed operation's message has arrived; an operation
        completes when it arrives."""
        extra: dict[str, float] = {}
        extra["pg_commit_throughput"] = sum(1 for _, _, e in ops if w0 <= e <= w1) / (w1 - w0)
        wanted = {op_id: s for op_id, s, _ in ops}
        arrived: dict[str, float] = {}
        drain_start = time.monotonic()
        deadline = drain_start + max(30.0, 3 * (w1 - w0))
        while time.monotonic() < deadline:
            for key, t in self.arrivals():
                if key in wanted and key not in arrived:
                    arrived[key] = t
            if len(arrived) >= len(wanted):
                break
            time.sleep(0.05)
        self.active.clear()
        extra["drain_s"] = time.monotonic() - drain_start
        relayed = self._relayed()
        rows, txns = relayed[0] - self._relay0[0], relayed[1] - self._relay0[1]
        if txns:
            extra["relay_rows_per_txn"] = rows / txns
        extra["lost"] = float(len(wanted) - len(arrived))
        return [(k, wanted[k], arrived[k]) for k in arrived], extra

    def close(self) -> None:
        self.stop.set()
        self.active.set()
        self.relay.join(15)
        self.consumer.join(15)
        for p in (self.relay, self.consumer):
            if p.is_alive():
                p.terminate()  # our own child, by its handle
        self.pool.close()
