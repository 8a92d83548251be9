"""The stages of the consume mode (``consume.py``): consume a batch of input messages,
write one row per message to PostgreSQL and produce one 1 KB output message per
message, three ways.

``exactly_once``    (e) the library: ``Coordinator.run_consumer`` without group commit,
                    one coordinated transaction (and one Kafka transaction) per batch;
                    the batch's offsets commit inside the Kafka transaction.
``at_least_once``   (f) INSERT + COMMIT in PostgreSQL, produce + flush (idempotent,
                    non-transactional producer), then ``consumer.commit(asynchronous=False)``.
``idempotent``      (g) the same with a dedup table: the row is inserted only when
                    ``INSERT INTO dedup ... ON CONFLICT DO NOTHING`` inserted the id.
``at_least_once_async``  reference, only with ``--consume-paths``: (f) with
                    ``commit(asynchronous=True)``, the offset commit not waited for.

Every stage runs in one thread with one consumer (``enable.auto.commit=false``,
``isolation.level=read_committed``) and writes the rows with ``executemany`` (which
psycopg pipelines). Where the time goes is measured as laps (:class:`Phases`) at the
boundaries each path has: for (e) through the library's public seams only
(``CoordinatorConfig.on_step``, ``CoordinatorConfig.producer_factory``, a
:class:`StageConsumer` handed to ``run_consumer``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from psycopg import sql

from coordinator import Coordinator, CoordinatorConfig, Step, Transaction

from .env import COORD_NAME, PAYLOAD, make_pool

__all__ = [
    "ALL_CONSUME_PATHS",
    "CONSUME_LABELS",
    "CONSUME_PATHS",
    "AtLeastOnce",
    "ExactlyOnce",
    "Phases",
    "Stage",
    "StageConsumer",
    "open_consumer",
]

CONSUME_PATHS = ("exactly_once", "at_least_once", "idempotent")
"""Measured by default."""
ALL_CONSUME_PATHS = (*CONSUME_PATHS, "at_least_once_async")
CONSUME_LABELS = {
    "exactly_once": "(e) exactly once: run_consumer, Kafka txn per batch",
    "at_least_once": "(f) at least once: COMMIT, produce+flush, commit offsets",
    "idempotent": "(g) idempotent consumer: dedup table, produce+flush, commit offsets",
    "at_least_once_async": "(ref) (f) with the offset commit not waited for (asynchronous)",
}
BATCH_TIMEOUT = 0.1
"""``consume(num_messages=batch, timeout=...)`` of every path (``run_consumer``'s default)."""
KAFKA_TIMEOUT = 30.0
FINISH = "loop"
"""The lap from the end of a batch's last step to the next ``consume()`` call."""


class Phases:
    """Wall time between consecutive boundaries of one stage's cycle, summed by the
    name of the phase that just ended. Called from the stage's thread only."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last: float | None = None

    def reset(self) -> None:
        self.totals = {}
        self._last = None

    def lap(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None:
            self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now


class StageConsumer(Consumer):
    """A consumer that records, at each ``consume()`` call, the batch the stage finished
    since the previous call (``pending`` messages, set by the stage): the same point
    for every path, after the batch's last step (for (e), ``COMMIT PREPARED``)."""

    def __init__(self, conf: dict[str, Any], phases: Phases, finish: str) -> None:
        super().__init__(conf)
        self.phases = phases
        self.finish = finish
        self.done: list[tuple[int, float, float]] = []
        """(messages, start of the consume() call of the batch, end of the batch)."""
        self.pending = 0
        self.consumed = 0
        self._batch_start = 0.0

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        now = time.monotonic()
        if self.pending:
            self.done.append((self.pending, self._batch_start, now))
            self.pending = 0
        self.phases.lap(self.finish, now)
        msgs = super().consume(num_messages, timeout)
        self.phases.lap("consume")
        self._batch_start = now
        self.consumed += len(msgs)
        return msgs


def open_consumer(brokers: str, group: str, topic: str, phases: Phases, finish: str,
                  timeout: float = 60.0) -> StageConsumer:
    """A consumer of a new group, joined and assigned every partition of ``topic``,
    its partitions paused (nothing fetched yet): the stage resumes them when its
    measurement starts, so that joining the group is not measured."""
    consumer = StageConsumer({
        "bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False,
        "isolation.level": "read_committed", "auto.offset.reset": "earliest",
    }, phases, finish)
    assigned = threading.Event()

    def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
        c.assign(parts)
        c.pause(parts)
        assigned.set()

    consumer.subscribe([topic], on_assign=on_assign)
    deadline = time.monotonic() + timeout
    while not assigned.is_set():
        msg = consumer.poll(0.1)
        if msg is not None and msg.error() is None:
            consumer.close()
            raise RuntimeError("a message was delivered before the measurement started")
        if time.monotonic() > deadline:
            consumer.close()
            raise TimeoutError(f"group {group} not assigned {topic} within {timeout} s")
    return consumer


def _key(m: Message) -> str:
    k = m.key()
    return k.decode() if isinstance(k, bytes) else str(k)


class Stage:
    """One way of running the stage; :meth:`run` from one thread until ``stop``."""

    name = ""
    finish = FINISH

    def __init__(self) -> None:
        self.phases = Phases()

    def run(self, consumer: StageConsumer, batch: int, stop: threading.Event) -> int:
        """Consume and process batches until ``stop``; the errors (retried batches)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TimedProducer(Producer):
    """The coordinator's transactional producer, with a lap after each Kafka call of
    a transaction (``producer_factory`` seam; ``produce()`` is not overridden)."""

    def __init__(self, conf: dict[str, Any], phases: Phases) -> None:
        super().__init__(conf)
        self._phases = phases

    def begin_transaction(self) -> None:
        super().begin_transaction()
        self._phases.lap("begin_transaction")

    def flush(self, timeout: float = -1) -> int:
        self._phases.lap("produce (enqueue)")
        left = super().flush(timeout)
        self._phases.lap("flush (delivery)")
        return left

    def send_offsets_to_transaction(self, positions: list[TopicPartition],
                                    group_metadata: Any, timeout: float = -1) -> None:
        super().send_offsets_to_transaction(positions, group_metadata, timeout)
        self._phases.lap("send_offsets_to_transaction")

    def commit_transaction(self, timeout: float = -1) -> None:
        super().commit_transaction(timeout)
        self._phases.lap("commit_transaction")


class ExactlyOnce(Stage):
    """(e) ``coord.run_consumer(consumer, handle, batch_size=batch)``, group commit off:
    each batch is one coordinated transaction whose Kafka transaction carries the
    output messages, the decision record and the batch's offsets."""

    name = "exactly_once"
    finish = "COMMIT PREPARED, loop"

    def __init__(self, dsn: str, brokers: str, insert: sql.Composed, topic: str,
                 instance: str) -> None:
        super().__init__()
        self.insert = insert
        self.topic = topic
        phases = self.phases

        def producer(conf: dict[str, Any]) -> Producer:
            return _TimedProducer(conf, phases)

        config = CoordinatorConfig(producers=1, group_commit=None, on_step=self._on_step,
                                   producer_factory=producer)
        # Two connections: the coordinator's instance lock holds one.
        self.pool = make_pool(dsn, 2, "bench-exactly-once")
        self.coord = Coordinator(self.pool, {"bootstrap.servers": brokers}, COORD_NAME,
                                 instance=instance, config=config)
        self.coord.open()
        self._consumer: StageConsumer | None = None

    def _on_step(self, step: Step, _gid: str | None) -> None:
        if step is Step.BEFORE_PREPARE:
            self.phases.lap("topic check, producer ticket")
        elif step is Step.AFTER_PREPARE:
            self.phases.lap("PREPARE TRANSACTION")

    def _handle(self, tx: Transaction, messages: Sequence[Message]) -> None:
        self.phases.lap("BEGIN (assignment, pool, group metadata)")
        keys = [_key(m) for m in messages]
        with tx.connection.cursor() as cur:
            cur.executemany(self.insert, [(k,) for k in keys])
        for k in keys:
            tx.produce(self.topic, value=PAYLOAD, key=k)
        self.phases.lap("INSERTs, stage messages")
        assert self._consumer is not None
        self._consumer.pending = len(messages)  # counted once committed

    def run(self, consumer: StageConsumer, batch: int, stop: threading.Event) -> int:
        self._consumer = consumer
        stats = self.coord.run_consumer(consumer, self._handle, batch_size=batch,
                                        batch_timeout=BATCH_TIMEOUT, stop=stop)
        return stats.retries + stats.handler_failures

    def close(self) -> None:
        self.coord.close()
        self.pool.close()


class _Deliveries:
    def __init__(self) -> None:
        self.error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None and self.error is None:
            self.error = err


class AtLeastOnce(Stage):
    """(f) and (g): PostgreSQL first (``statement`` once per message, then COMMIT),
    then the output messages (produce, flush, every delivery report checked), then the
    consumer's offsets (``commit(asynchronous=False)``). A crash in between delivers
    the batch again: (f) writes its rows and messages again; (g)'s dedup table keeps
    the rows once, its messages are written again."""

    def __init__(self, name: str, dsn: str, brokers: str, statement: sql.Composed,
                 topic: str, pg_phase: str, wait_commit: bool = True) -> None:
        super().__init__()
        self.name = name
        self.wait_commit = wait_commit
        self.statement = statement
        self.topic = topic
        self.pg_phase = pg_phase
        self.pool = make_pool(dsn, 1, f"bench-{name}")
        self.producer = Producer({
            "bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
            "linger.ms": 1,
        })

    def run(self, consumer: StageConsumer, batch: int, stop: threading.Event) -> int:
        while not stop.is_set():
            msgs = [m for m in consumer.consume(batch, BATCH_TIMEOUT) if m.error() is None]
            if msgs:
                self._process(consumer, msgs)
        if not self.wait_commit and (consumer.done or consumer.pending):
            # Wait for what is still in flight, as at shutdown (_NO_OFFSET: nothing was).
            with contextlib.suppress(KafkaException):
                consumer.commit(asynchronous=False)
        return 0

    def _process(self, consumer: StageConsumer, msgs: list[Message]) -> None:
        keys = [_key(m) for m in msgs]
        with self.pool.connection() as conn, conn.cursor() as cur:
            cur.executemany(self.statement, [(k,) for k in keys])
        self.phases.lap(self.pg_phase)
        deliveries = _Deliveries()
        for k in keys:
            while True:
                try:
                    self.producer.produce(self.topic, value=PAYLOAD, key=k,
                                          on_delivery=deliveries)
                    break
                except BufferError:
                    self.producer.poll(0.05)
        self.phases.lap("produce (enqueue)")
        if self.producer.flush(KAFKA_TIMEOUT) or deliveries.error is not None:
            raise RuntimeError(f"output not delivered: {deliveries.error}")
        self.phases.lap("flush (delivery)")
        if self.wait_commit:
            consumer.commit(asynchronous=False)
            self.phases.lap("commit offsets")
        else:
            consumer.commit(asynchronous=True)
            self.phases.lap("commit offsets (asynchronous)")
        consumer.pending = len(msgs)

    def close(self) -> None:
        self.producer.flush(KAFKA_TIMEOUT)
        self.pool.close()
