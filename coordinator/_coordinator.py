"""The coordinator: a context manager that commits PostgreSQL and Kafka together."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import psycopg
from confluent_kafka import Consumer, Message
from psycopg_pool import ConnectionPool

from ._base import CoordinatorBase
from ._consume import ConsumerStats, Handler, run_consumer
from ._enums import Phase
from ._errmap import pg_startup_error
from ._logging import log_extra
from ._sqlalchemy import EnginePool, check_postgres, engine_pool
from ._transaction import Transaction
from .config import CoordinatorConfig
from .prepared import Connection

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["Coordinator", "Transaction"]

log = logging.getLogger("coordinator")


class Coordinator(CoordinatorBase):
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
        postgres: str | ConnectionPool[Any] | Engine,
        kafka: Mapping[str, Any],
        name: str,
        *,
        instance: str | None = None,
        config: CoordinatorConfig | None = None,
    ) -> None:
        self._engine = engine_pool(postgres)
        check_postgres(postgres, self._engine, asyncio_=False)
        super().__init__(postgres, kafka, name, instance=instance, config=config)
        self._pool: ConnectionPool[Any] | EnginePool | None

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
                self._open_pool()
                with self._startup_connection() as conn:
                    self._startup_postgres(conn)  # may keep conn as the instance lock's
                self._open_kafka()
                with self._startup_connection() as conn:
                    self._register_log(conn)
            except BaseException:
                self._close_resources()
                raise
            self._open = True
        log.info("coordinator name=%s instance=%s ready (%d producers, decision topic %s)",
                 self.name, self.instance, self.config.producers,
                 self.config.decision_topic.name,
                 extra=log_extra(phase=Phase.STARTUP, name=self.name, instance=self.instance))
        return self

    def close(self) -> None:
        with self._state_lock:
            self._open = False
            self._close_resources()

    def _open_pool(self) -> None:
        if self._engine is not None:
            self._pool = self._engine
            return
        if isinstance(self._postgres, ConnectionPool):
            self._pool = self._postgres
            return
        self._pool = ConnectionPool(self._postgres, **self._pool_options())
        self._owns_pool = True
        try:
            self._pool.open(wait=True, timeout=self.config.startup_timeout)
        except Exception as exc:
            raise self._pool_unavailable(exc) from None

    @contextlib.contextmanager
    def _startup_connection(self) -> Iterator[Connection]:
        """A pooled connection in autocommit mode for start-up work; given back at
        the end unless it became the instance lock's session."""
        assert self._pool is not None
        try:
            conn: Connection = self._pool.getconn(timeout=self.config.startup_timeout)
        except Exception as exc:
            raise pg_startup_error(exc) from None
        autocommit = conn.autocommit  # the pool's own setting, given back as it was
        try:
            conn.autocommit = True
            yield conn
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None
        finally:
            if conn is not self._lock_conn:
                with contextlib.suppress(psycopg.Error):
                    conn.autocommit = autocommit
                self._pool.putconn(conn)

    def _close_resources(self) -> None:
        self._close_kafka()
        lock_conn = self._unlock_instance()
        if lock_conn is not None and self._pool is not None:
            self._pool.putconn(lock_conn)
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None

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
        return Transaction(self, idempotency_key,
                           self._batch(idempotency_key, consumer, consumed))

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
