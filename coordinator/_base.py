"""What the synchronous and the asyncio coordinators share: configuration, the
Kafka side (producers, committer, decision log) and the PostgreSQL start-up checks.

The Kafka side is the same objects for both (its calls block; the asyncio
coordinator runs them in worker threads). The PostgreSQL start-up runs on a
synchronous connection in both (the asyncio coordinator opens it in a worker
thread), so there is one copy of every check.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient

from . import _postgres
from ._committer import Committer, PerOperationCommitter
from ._consumed import ConsumedBatch
from ._enums import Phase
from ._errmap import describe, kafka_startup_error, pg_startup_error
from ._observing import Observers
from ._outcomes import TopicUnusable
from ._producers import ProducerPool, ProducerSlot
from .config import CoordinatorConfig, default_instance
from .decision_log import (
    DecisionLog,
    ensure_decision_topic,
    high_watermarks,
    partition_for,
)
from .errors import ConfigurationError, ServiceUnavailable, UsageError
from .gid import check_identifier, transactional_id
from .prepared import Connection, list_prepared
from .registry import LogRegistry

__all__ = ["CoordinatorBase"]

log = logging.getLogger("coordinator")


class CoordinatorBase:
    """State and start-up shared by :class:`~coordinator.Coordinator` and
    :class:`~coordinator.AsyncCoordinator`."""

    def __init__(
        self,
        postgres: Any,
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
        self._lock_conn: Connection | None = None
        self._pool: Any = None
        """The driver's connection pool (sync or async) while open."""
        self._owns_pool = False
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
        self._observers = Observers(self.config.observers, self.name, self.instance)
        self.started_at: datetime | None = None
        """PostgreSQL's clock when this coordinator opened."""
        self.inherited_gids: frozenset[str] = frozenset()
        """This instance's prepared transactions found at ``open()``, before its
        producers fenced their previous incarnation: that fence decided them (no
        producer of theirs can commit any more), so ``recovery.recover_own``
        resolves them without a grace period or a fence of its own. A set, not a
        time: no clock is trusted."""

    # -- start-up -------------------------------------------------------------

    def _startup_postgres(self, conn: Connection) -> bool:
        """The PostgreSQL start-up checks and set-up, on a synchronous connection in
        autocommit mode. Returns whether ``conn`` was kept (as the instance lock's
        session, for the coordinator's lifetime: ``_lock_conn``)."""
        cfg = self.config
        try:
            _postgres.check_server(conn)
            before = time.time()
            row = conn.execute("SELECT now(), extract(epoch FROM clock_timestamp())::float8"
                               ).fetchone()
            after = time.time()
            assert row is not None and isinstance(row[0], datetime)
            self.started_at = row[0]
            _check_clock(float(str(row[1])), before, after, cfg.max_clock_skew_seconds)
            self._idem.create(conn)
            self._registry.create(conn)
            if cfg.instance_lock:
                self._take_instance_lock(conn)
            # After the instance lock (no other live coordinator of this instance) and
            # before the producers' fence in _open_kafka.
            self.inherited_gids = frozenset(
                t.text for t in list_prepared(conn, self.name, self.instance))
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None
        return self._lock_conn is conn

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
                on_start=self._observers.producer_started,
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

    def _register_log(self, conn: Connection) -> None:
        """Record this coordinator's decision log for recovery (see ``registry.py``),
        on a synchronous connection in autocommit mode."""
        assert self._log is not None
        try:
            self._registry.register(conn, self._log, self.name,
                                    self.config.transaction_timeout_ms)
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None

    def _close_kafka(self) -> None:
        self._committer = None
        if self._producers is not None:
            self._producers.close()
            self._producers = None
        self._admin = None

    def _unlock_instance(self) -> Connection | None:
        """Release the instance lock; returns its session for the caller to close
        or give back."""
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)",
                             (_postgres.instance_lock_key(self.name, self.instance),))
        return conn

    @property
    def decision_log(self) -> DecisionLog:
        """The decision log this coordinator writes to (once open)."""
        if self._log is None:
            raise UsageError("the coordinator is not open")
        return self._log

    @property
    def transactional_ids(self) -> list[str]:
        """The transactional.ids this instance's producers use."""
        return [transactional_id(self.name, self.instance, i)
                for i in range(self.config.producers)]

    def _ready(self) -> tuple[Any, Committer]:
        """The connection pool and the committer; raises unless open."""
        if not self._open or self._committer is None or self._pool is None:
            raise UsageError("the coordinator is not open: use it as a context manager "
                             "or call open() first")
        return self._pool, self._committer

    def _pool_max_size(self) -> int:
        return int(self._pool.max_size) if self._pool is not None else 1

    def _pool_options(self) -> dict[str, Any]:
        """How the coordinator makes its own pool (from a conninfo string)."""
        cfg = self.config
        return {"min_size": cfg.pool_min_size, "max_size": cfg.pool_max_size,
                "timeout": cfg.connection_timeout, "open": False,
                "name": f"pk2pc-{self.name}"}

    def _pool_unavailable(self, exc: BaseException) -> ServiceUnavailable:
        return ServiceUnavailable(
            "PostgreSQL unreachable or credentials rejected: could not open the "
            f"connection pool within {self.config.startup_timeout}s ({describe(exc)})",
            phase=Phase.STARTUP)

    def _batch(self, idempotency_key: str | None, consumer: Consumer | None,
               consumed: Sequence[Message] | None) -> ConsumedBatch | None:
        """Check a transaction's arguments; the consumed batch, if any."""
        if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 512):
            raise UsageError("idempotency_key must be a non-empty string of at most 512 chars")
        if (consumer is None) != (consumed is None):
            raise UsageError("consumer= and consumed= go together")
        if consumer is not None and consumed is not None:
            if not consumed:
                raise UsageError("consumed= is empty: nothing to commit for the consumer")
            return ConsumedBatch.of(consumer, consumed)
        return None

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
