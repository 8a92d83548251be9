"""The coordinator: a context manager that commits PostgreSQL and Kafka together."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Self

import psycopg
from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import _postgres
from ._committer import Committer, PerOperationCommitter
from ._consume import ConsumerStats, Handler, run_consumer
from ._consumed import ConsumedBatch
from ._enums import Phase
from ._errmap import (
    describe,
    kafka_startup_error,
    pg_startup_error,
)
from ._outcomes import TopicUnusable
from ._producers import ProducerPool, ProducerSlot
from ._transaction import Transaction
from .config import CoordinatorConfig, default_instance
from .decision_log import (
    DecisionLog,
    ensure_decision_topic,
    high_watermarks,
    partition_for,
)
from .errors import (
    ConfigurationError,
    ServiceUnavailable,
    UsageError,
)
from .gid import check_identifier, transactional_id
from .prepared import Connection, list_prepared
from .registry import LogRegistry

__all__ = ["Coordinator", "Transaction"]

log = logging.getLogger("coordinator")

Query = str | bytes | sql.SQL | sql.Composed
Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


class Coordinator:
    """Commits a PostgreSQL transaction and a Kafka transaction together.

    ``postgres`` is a conninfo string (the coordinator makes and owns a
    connection pool) or a :class:`psycopg_pool.ConnectionPool` (borrowed, not
    closed). ``kafka`` is a confluent-kafka configuration, passed through to
    the producers. ``name`` identifies this service's transactions (recovery
    takes the same name); ``instance`` identifies this running process and
    must be unique among processes running at the same time and stable across
    its restarts (default: the host name; see ``docs/configuration.md``).

    One coordinator is safe to share between threads: each transaction takes
    its own connection from the pool and a producer from the producer pool.
    """

    def __init__(
        self,
        postgres: str | ConnectionPool[Any],
        kafka: Mapping[str, Any],
        name: str,
        *,
        instance: str | None = None,
        config: CoordinatorConfig | None = None,
    ) -> None:
        try:
            self.name = check_identifier(name, "name")
            self.instance = check_identifier(instance or default_instance(), "instance")
        except ValueError as exc:
            raise ConfigurationError(str(exc), phase=Phase.STARTUP) from None
        self.config = config or CoordinatorConfig()
        if "bootstrap.servers" not in kafka:
            raise ConfigurationError("kafka configuration needs 'bootstrap.servers'")
        if "transactional.id" in kafka:
            raise ConfigurationError(
                "do not set 'transactional.id': the coordinator derives one per producer "
                "from name and instance"
            )
        self._kafka_conf = dict(kafka)
        self._postgres = postgres
        self._pool: ConnectionPool[Any] | None = None
        self._owns_pool = False
        self._lock_conn: Connection | None = None
        self._producers: ProducerPool | None = None
        self._committer: Committer | None = None
        self._admin: AdminClient | None = None
        self._idem = _postgres.IdempotencyTable(
            self.config.idempotency_table, self.config.idempotency_schema,
            self.config.idempotency_wait_ms,
        )
        self._registry = LogRegistry(self.config.decision_log_table,
                                     self.config.idempotency_schema)
        self._log: DecisionLog | None = None
        self._known_topics: set[str] = set()
        self._state_lock = threading.Lock()
        self._open = False
        self.started_at: datetime | None = None
        """PostgreSQL's clock when this coordinator opened."""
        self.inherited_gids: frozenset[str] = frozenset()
        """This instance's prepared transactions found at ``open()``, before its
        producers fenced their previous incarnation: that fence decided them (no
        producer of theirs can commit any more), so ``recovery.recover_own``
        resolves them without a grace period or a fence of its own. A set, not a
        time: no clock is trusted."""

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Self:
        """Run the start-up checks, fence older producers of this instance, and
        get ready. Raises a :class:`~coordinator.ConfigurationError` or
        :class:`~coordinator.ServiceUnavailable` with a clear message."""
        with self._state_lock:
            if self._open:
                return self
            try:
                self._open_postgres()
                self._open_kafka()
                self._register_log()
            except BaseException:
                self._close_resources()
                raise
            self._open = True
        log.info("coordinator name=%s instance=%s ready (%d producers, decision topic %s)",
                 self.name, self.instance, self.config.producers,
                 self.config.decision_topic.name)
        return self

    def close(self) -> None:
        with self._state_lock:
            self._open = False
            self._close_resources()

    def _open_postgres(self) -> None:
        cfg = self.config
        if isinstance(self._postgres, ConnectionPool):
            self._pool = self._postgres
        else:
            self._pool = ConnectionPool(
                self._postgres, min_size=cfg.pool_min_size, max_size=cfg.pool_max_size,
                timeout=cfg.connection_timeout, open=False, name=f"pk2pc-{self.name}",
            )
            self._owns_pool = True
            try:
                self._pool.open(wait=True, timeout=cfg.startup_timeout)
            except Exception as exc:
                raise ServiceUnavailable(
                    "PostgreSQL unreachable or credentials rejected: could not open the "
                    f"connection pool within {cfg.startup_timeout}s ({describe(exc)})",
                    phase=Phase.STARTUP) from None
        try:
            conn = self._pool.getconn(timeout=cfg.startup_timeout)
        except Exception as exc:
            raise pg_startup_error(exc) from None
        try:
            conn.autocommit = True
            _postgres.check_server(conn)
            before = time.time()
            row = conn.execute("SELECT now(), extract(epoch FROM clock_timestamp())::float8"
                               ).fetchone()
            after = time.time()
            assert row is not None
            self.started_at = row[0]
            _check_clock(float(row[1]), before, after, cfg.max_clock_skew_seconds)
            self._idem.create(conn)
            self._registry.create(conn)
            if cfg.instance_lock:
                self._take_instance_lock(conn)
            # After the instance lock (no other live coordinator of this instance) and
            # before the producers' fence in _open_kafka.
            self.inherited_gids = frozenset(
                t.text for t in list_prepared(conn, self.name, self.instance))
            if cfg.instance_lock:
                conn = None  # kept for the coordinator's lifetime
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None
        finally:
            if conn is not None:
                self._pool.putconn(conn)

    def _take_instance_lock(self, conn: Connection) -> None:
        key = _postgres.instance_lock_key(self.name, self.instance)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not row or not row[0]:
            # The caller (_open_postgres) gives the connection back to the pool.
            raise ConfigurationError(
                f"instance {self.instance!r} of {self.name!r} is already in use by a running "
                "coordinator. Every process needs its own instance id (instance=...); "
                "two processes with one id would fence each other's Kafka producers",
                phase=Phase.STARTUP,
            )
        self._lock_conn = conn

    def _open_kafka(self) -> None:
        cfg = self.config
        common = self._kafka_conf
        admin = self._admin = AdminClient(common)
        try:
            self._log = log = ensure_decision_topic(admin, cfg.decision_topic, cfg.kafka_timeout)
        except KafkaException as exc:
            raise kafka_startup_error(exc, "reaching the brokers") from None
        self._known_topics.add(cfg.decision_topic.name)

        def high_watermark(partition: int) -> int:
            return high_watermarks(admin, log.topic, {partition}, cfg.kafka_timeout)[partition]

        producer_conf = {
            "linger.ms": 1,
            **common,
            "transaction.timeout.ms": cfg.transaction_timeout_ms,
            "enable.idempotence": True,
            "acks": "all",
            **cfg.producer_overrides,
        }
        slots = [
            ProducerSlot(
                i,
                transactional_id(self.name, self.instance, i),
                partition_for(self.instance, i, log.partitions),
                producer_conf,
                cfg.kafka_timeout,
                high_watermark=high_watermark,
                factory=cfg.producer_factory,
            )
            for i in range(cfg.producers)
        ]
        self._producers = ProducerPool(slots)
        self._producers.start(time.monotonic() + cfg.startup_timeout)
        if cfg.group_commit is not None:
            from ._group import GroupCommitter

            self._committer = GroupCommitter(
                self._producers, cfg.decision_topic.name, cfg.kafka_commit_retry,
                cfg.kafka_timeout, cfg.group_commit,
            )
        else:
            self._committer = PerOperationCommitter(
                self._producers, cfg.decision_topic.name, cfg.kafka_commit_retry,
                cfg.kafka_timeout,
            )

    def _register_log(self) -> None:
        """Record this coordinator's decision log for recovery (see ``registry.py``)."""
        assert self._pool is not None and self._log is not None
        try:
            with self._pool.connection(timeout=self.config.startup_timeout) as conn:
                conn.autocommit = True
                try:
                    self._registry.register(conn, self._log, self.name,
                                            self.config.transaction_timeout_ms)
                finally:
                    conn.autocommit = False
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None

    @property
    def decision_log(self) -> DecisionLog:
        """The decision log this coordinator writes to (once open)."""
        if self._log is None:
            raise UsageError("the coordinator is not open")
        return self._log

    def _close_resources(self) -> None:
        self._committer = None
        if self._producers is not None:
            self._producers.close()
            self._producers = None
        if self._lock_conn is not None and self._pool is not None:
            with contextlib.suppress(psycopg.Error):
                self._lock_conn.execute(
                    "SELECT pg_advisory_unlock(%s)",
                    (_postgres.instance_lock_key(self.name, self.instance),),
                )
            self._pool.putconn(self._lock_conn)
        self._lock_conn = None
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None
        self._admin = None

    # -- transactions -------------------------------------------------------

    def transaction(
        self,
        idempotency_key: str | None = None,
        *,
        consumer: Consumer | None = None,
        consumed: Sequence[Message] | None = None,
    ) -> Transaction:
        """A new coordinated transaction; use it as a context manager.

        With ``consumer`` and ``consumed`` (messages it delivered), the batch's
        offsets commit in the same Kafka transaction as the messages and the
        decision record; if the transaction rolls back, the consumer is rewound to
        its committed offsets so the batch is delivered again. The consumer must
        not commit offsets itself (``enable.auto.commit=false``).
        """
        if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 512):
            raise UsageError("idempotency_key must be a non-empty string of at most 512 chars")
        if (consumer is None) != (consumed is None):
            raise UsageError("consumer= and consumed= go together")
        batch = None
        if consumer is not None and consumed is not None:
            if not consumed:
                raise UsageError("consumed= is empty: nothing to commit for the consumer")
            batch = ConsumedBatch.of(consumer, consumed)
        return Transaction(self, idempotency_key, batch)

    def run_consumer(
        self,
        consumer: Consumer,
        handle: Handler,
        *,
        batch_size: int = 500,
        batch_timeout: float = 0.1,
        max_attempts: int = 5,
        dead_letter_topic: str | None = None,
        stop: threading.Event | None = None,
    ) -> ConsumerStats:
        """Consume batches and ``handle(tx, messages)`` each in one coordinated
        transaction that also commits the batch's offsets, until ``stop`` is set.

        Poison messages are isolated (the batch is split), retried up to
        ``max_attempts`` times, then written to ``dead_letter_topic`` with their
        offset committed in the same transaction (without one: ``PoisonMessage``).
        See ``docs/how-it-works.md`` (the consume path).
        """
        return run_consumer(self, consumer, handle, batch_size=batch_size,
                            batch_timeout=batch_timeout, max_attempts=max_attempts,
                            dead_letter_topic=dead_letter_topic, stop=stop)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """A connection of the coordinator's pool, for work outside coordinated
        transactions (schema set-up, reads, recovery). As psycopg_pool's
        ``connection()``: committed at the end of the block, rolled back on error."""
        pool, _ = self._ready()
        with pool.connection(timeout=timeout) as conn:
            yield conn

    @property
    def transactional_ids(self) -> list[str]:
        """The transactional.ids this instance's producers use."""
        return [transactional_id(self.name, self.instance, i)
                for i in range(self.config.producers)]

    def _ready(self) -> tuple[ConnectionPool[Any], Committer]:
        if not self._open or self._pool is None or self._committer is None:
            raise UsageError("the coordinator is not open: use it as a context manager "
                             "or call open() first")
        return self._pool, self._committer

    def _check_topics(self, topics: set[str]) -> None:
        """Raise ``TopicUnusable`` unless every topic exists (cached once seen)."""
        unknown = topics - self._known_topics
        if not unknown or not self.config.check_topics or self._admin is None:
            return
        for topic in sorted(unknown):
            try:
                md = self._admin.list_topics(topic, timeout=self.config.kafka_timeout)
            except KafkaException as exc:
                raise TopicUnusable(f"cannot check Kafka topic {topic!r}: "
                                     f"{describe(exc)}") from None
            t = md.topics.get(topic)
            if t is None or t.error is not None or not t.partitions:
                reason = t.error.str() if t is not None and t.error is not None else "missing"
                raise TopicUnusable(f"Kafka topic {topic!r} does not exist ({reason})")
            self._known_topics.add(topic)


def _check_clock(pg_epoch: float, before: float, after: float, limit: float | None) -> None:
    """Fail start-up when this host's clock and PostgreSQL's are far apart."""
    if limit is None:
        return
    skew = pg_epoch - (before + after) / 2
    if abs(skew) > limit + (after - before):
        raise ConfigurationError(
            f"this host's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} "
            f"PostgreSQL's (more than max_clock_skew_seconds={limit:g}); fix time "
            "synchronisation (NTP) on this host or the database server",
            phase=Phase.STARTUP)
