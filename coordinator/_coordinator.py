"""The coordinator: a context manager that commits PostgreSQL and Kafka together."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from . import _pg
from ._committer import Committer, PerOperationCommitter, Ticket
from ._enums import Phase, Status, Step
from ._errmap import (
    describe,
    is_connection_error,
    kafka_startup_error,
    pg_prepare_error,
    pg_startup_error,
)
from ._kafka import KafkaOutcome, ProducerPool, ProducerSlot, StagedMessage
from ._protocol import Event, Protocol
from .config import CoordinatorConfig, default_instance
from .decision_log import (
    DecisionLog,
    DecisionRecord,
    ensure_decision_topic,
    high_watermarks,
    partition_for,
)
from .errors import (
    CommittedPendingRecovery,
    ConfigurationError,
    Diverged,
    Error,
    OutcomeUnknown,
    RolledBack,
    ServiceUnavailable,
    UsageError,
)
from .gid import Gid, check_identifier, transactional_id
from .registry import LogRegistry

__all__ = ["Coordinator", "Transaction"]

log = logging.getLogger("coordinator")

Connection = psycopg.Connection[tuple[object, ...]]
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
        self._idem = _pg.IdempotencyTable(
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
        """PostgreSQL's clock when this coordinator opened, before its producers fenced
        older producers of this instance (used by ``recovery.recover_own``)."""

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
            _pg.check_server(conn)
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
                conn = None  # kept for the coordinator's lifetime
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None
        finally:
            if conn is not None:
                self._pool.putconn(conn)

    def _take_instance_lock(self, conn: Connection) -> None:
        key = _pg.instance_lock_key(self.name, self.instance)
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
                    (_pg.instance_lock_key(self.name, self.instance),),
                )
            self._pool.putconn(self._lock_conn)
        self._lock_conn = None
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None
        self._admin = None

    # -- transactions -------------------------------------------------------

    def transaction(self, idempotency_key: str | None = None) -> Transaction:
        """A new coordinated transaction; use it as a context manager."""
        if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 512):
            raise UsageError("idempotency_key must be a non-empty string of at most 512 chars")
        return Transaction(self, idempotency_key)

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

    def _check_topics(self, topics: set[str], log_id: str) -> None:
        unknown = topics - self._known_topics
        if not unknown or not self.config.check_topics or self._admin is None:
            return
        for topic in sorted(unknown):
            try:
                md = self._admin.list_topics(topic, timeout=self.config.kafka_timeout)
            except KafkaException as exc:
                raise RolledBack(f"cannot check Kafka topic {topic!r}: {describe(exc)}; "
                                 "rolled back, nothing published", gid=log_id,
                                 phase=Phase.PRODUCE) from None
            t = md.topics.get(topic)
            if t is None or t.error is not None or not t.partitions:
                reason = t.error.str() if t is not None and t.error is not None else "missing"
                raise RolledBack(f"Kafka topic {topic!r} does not exist ({reason}); "
                                 "rolled back, nothing published", gid=log_id,
                                 phase=Phase.PRODUCE)
            self._known_topics.add(topic)


class Transaction:
    """One coordinated transaction. Use it as a context manager from
    :meth:`Coordinator.transaction`; inside the block, write with
    :meth:`execute` (or :attr:`connection`) and :meth:`produce`.

    Never call ``commit()`` or ``rollback()`` on :attr:`connection`: the
    coordinator ends the transaction. Savepoints (``connection.transaction()``)
    are fine.
    """

    def __init__(self, coordinator: Coordinator, idempotency_key: str | None) -> None:
        self._coord = coordinator
        self.idempotency_key = idempotency_key
        self.txid = uuid.uuid4().hex
        self.gid: str | None = None
        """The PostgreSQL gid, known once the transaction reaches PREPARE."""
        self._protocol = Protocol()
        self._conn: Connection | None = None
        self._conn_autocommit = False
        self._messages: list[StagedMessage] = []
        self._xid: int | None = None
        self._entered = False
        self._ended = False

    @property
    def status(self) -> Status:
        return self._protocol.status

    @property
    def connection(self) -> Connection:
        """The psycopg connection of this transaction (inside the block only)."""
        if self._conn is None or self._ended:
            raise UsageError("the transaction's connection is only available inside the block")
        return self._conn

    @property
    def _log_id(self) -> str:
        return self.gid or f"(txid {self.txid})"

    def execute(self, query: Query, params: Any = None) -> psycopg.Cursor[tuple[object, ...]]:
        """Execute a statement in the transaction; returns the cursor."""
        return self.connection.execute(query, params)

    def produce(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Stage a message; it is produced in the Kafka transaction at commit."""
        if not self._entered or self._ended:
            raise UsageError("produce() is only allowed inside the transaction's block")
        if not topic:
            raise UsageError("produce() needs a topic")
        hdrs: tuple[tuple[str, bytes], ...] = ()
        if headers:
            items = headers.items() if isinstance(headers, Mapping) else headers
            hdrs = tuple((str(k), _to_bytes(v)) for k, v in items)
        self._messages.append(
            StagedMessage(topic, _to_bytes_opt(value), _to_bytes_opt(key), hdrs, partition)
        )

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> Self:
        if self._entered:
            raise UsageError("a Transaction can be used only once")
        self._entered = True
        pool, _ = self._coord._ready()
        conn = self._begin(pool)
        self._conn = conn
        try:
            if self.idempotency_key is not None:
                self._coord._idem.claim(conn, self.idempotency_key, self.txid)
        except BaseException as exc:
            self._fail_quietly()
            if isinstance(exc, Error):
                raise
            if isinstance(exc, psycopg.Error):
                raise ServiceUnavailable(f"PostgreSQL: {describe(exc)}",
                                         phase=Phase.BEGIN) from exc
            raise
        return self

    def _begin(self, pool: ConnectionPool[Any]) -> Connection:
        """A pooled connection with a transaction begun on it.

        A pooled connection found broken (the server restarted, the network
        dropped) is discarded and another one taken: nothing was done yet.
        """
        attempts = max(2, min(pool.max_size, 5))
        for attempt in range(attempts):
            try:
                conn: Connection = pool.getconn(timeout=self._coord.config.connection_timeout)
            except Exception as exc:
                self._protocol.fire(Event.BLOCK_FAILED)
                self._ended = True
                raise ServiceUnavailable(f"no PostgreSQL connection: {describe(exc)}",
                                         phase=Phase.BEGIN) from None
            self._conn_autocommit = conn.autocommit
            try:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.rollback()
                conn.autocommit = True
                conn.execute("BEGIN")
                return conn
            except psycopg.Error as exc:
                pool.putconn(conn)  # the pool discards a broken connection
                if is_connection_error(exc) and attempt + 1 < attempts:
                    log.info("discarding a broken pooled connection (%s)", describe(exc))
                    continue
                self._protocol.fire(Event.BLOCK_FAILED)
                self._ended = True
                raise ServiceUnavailable(f"PostgreSQL: {describe(exc)}",
                                         phase=Phase.BEGIN) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ended:  # __enter__ failed
            return
        if exc is not None:
            self._fail_quietly()
            log.debug("%s rolled back: the block raised %s", self._log_id, exc_type.__name__
                      if exc_type else "")
            return  # the block's exception propagates unchanged
        try:
            self._commit()
        finally:
            self._release()

    def _fail_quietly(self, event: Event = Event.BLOCK_FAILED) -> None:
        """Roll PostgreSQL back (if still open), record ``event``, release the connection."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # a broken connection rolls back on its own
        if self._protocol.allows(event):
            self._protocol.fire(event)
        self._release()

    def _release(self) -> None:
        self._ended = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        pool = self._coord._pool
        try:
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                conn.autocommit = self._conn_autocommit
        except psycopg.Error:
            pass
        if pool is not None:
            pool.putconn(conn)

    # -- the protocol ------------------------------------------------------

    def _commit(self) -> None:
        coord = self._coord
        conn = self._conn
        assert conn is not None
        state = conn.info.transaction_status
        if state == TransactionStatus.INERROR:
            self._fail_quietly()
            raise RolledBack("a statement inside the block failed; rolled back, nothing "
                             "published", gid=self.gid, phase=Phase.EXECUTE)
        if state != TransactionStatus.INTRANS:
            self._fail_quietly()
            raise UsageError("the block ended the PostgreSQL transaction itself (commit() or "
                             "rollback() on tx.connection); its work is NOT coordinated",
                             phase=Phase.EXECUTE)
        if not self._messages:
            self._commit_one_phase(conn)
            return
        _, committer = coord._ready()
        try:
            coord._check_topics({m.topic for m in self._messages}, self._log_id)
        except RolledBack:
            self._fail_quietly(Event.FAILED_BEFORE_COMMIT)
            raise
        try:
            ticket = committer.join(coord.config.connection_timeout)
        except (TimeoutError, KafkaException) as exc:
            self._fail_quietly(Event.FAILED_BEFORE_COMMIT)
            raise RolledBack(f"no Kafka producer session ({describe(exc)}); rolled back, "
                             "nothing published", gid=self._log_id,
                             phase=Phase.PREPARE) from None
        try:
            self._prepare(conn, ticket)
            self._step(Step.AFTER_PREPARE)
        except BaseException:
            ticket.cancel()  # the slot is free again; whatever is prepared stays in doubt
            raise
        self._kafka_commit(ticket)
        self._step(Step.AFTER_KAFKA_COMMIT)
        self._finish_commit()

    def _step(self, step: Step) -> None:
        hook = self._coord.config.on_step
        if hook is not None:
            hook(step, self.gid)

    def _commit_one_phase(self, conn: Connection) -> None:
        """No Kafka message: a plain COMMIT is the whole protocol."""
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._fail_quietly()
            if is_connection_error(exc):  # not class 40: a deadlock is a rollback
                raise OutcomeUnknown(
                    f"connection lost during COMMIT (no Kafka message): {describe(exc)}",
                    phase=Phase.PG_COMMIT) from exc
            raise RolledBack(f"COMMIT failed: {describe(exc)}", phase=Phase.PG_COMMIT) from exc
        self._protocol.fire(Event.ONE_PHASE_COMMITTED)

    def _prepare(self, conn: Connection, ticket: Ticket) -> None:
        coord = self._coord
        gid = Gid.new(coord.name, coord.instance, ticket.slot.index,
                      ticket.slot.decision_partition, ticket.session.floor,
                      coord.decision_log.fingerprint)
        self.gid = str(gid)
        self._step(Step.BEFORE_PREPARE)
        try:
            if self.idempotency_key is not None:
                coord._idem.record_gid(conn, self.idempotency_key, self.gid)
            self._xid = _pg.prepare(conn, self.gid)
        except (psycopg.Error, _pg.NotPrepared) as exc:
            lost = is_connection_error(exc)
            self._fail_quietly(Event.PREPARE_FAILED)
            if lost:
                # The PREPARE may have happened before the connection broke; no decision
                # was written, so the only possible outcome is rollback.
                complete = self._rollback_prepared_quietly()
                raise RolledBack(f"connection lost at PREPARE ({describe(exc)}); rolled back, "
                                 "nothing published", gid=self.gid, phase=Phase.PREPARE,
                                 complete=complete) from exc
            if isinstance(exc, _pg.NotPrepared):
                raise RolledBack(str(exc), gid=self.gid, phase=Phase.PREPARE) from None
            raise pg_prepare_error(exc, self.gid) from exc
        self._protocol.fire(Event.PREPARED)
        log.debug("gid=%s prepared", self.gid)

    def _kafka_commit(self, ticket: Ticket) -> None:
        assert self.gid is not None
        gid = self.gid
        result = ticket.commit(self._messages, DecisionRecord(gid))
        if result.outcome is not KafkaOutcome.FAILED_BEFORE_COMMIT:
            # commit_transaction() was called (PREPARED -> COMMITTING); a produce
            # failure never got that far and goes PREPARED -> ROLLED_BACK.
            self._protocol.fire(Event.KAFKA_COMMIT_STARTED)
        if result.outcome is KafkaOutcome.COMMITTED:
            self._protocol.fire(Event.KAFKA_COMMITTED)
            log.debug("gid=%s Kafka committed in %.1f ms", gid, result.commit_seconds * 1e3)
            return
        if result.outcome is KafkaOutcome.UNKNOWN:
            self._protocol.fire(Event.KAFKA_OUTCOME_UNKNOWN)
            log.error("gid=%s Kafka commit outcome unknown (%s); PostgreSQL left prepared "
                      "for recovery", gid, result.detail)
            raise OutcomeUnknown(
                f"the Kafka commit outcome is unknown ({result.detail}); the PostgreSQL "
                "transaction stays prepared until the recovery worker decides it from the "
                "decision log", gid=gid, phase=Phase.KAFKA_COMMIT) from result.error
        # FAILED_BEFORE_COMMIT or ABORTED: the Kafka transaction cannot commit.
        before = result.outcome is KafkaOutcome.FAILED_BEFORE_COMMIT
        self._protocol.fire(Event.KAFKA_ABORTED if not before else Event.FAILED_BEFORE_COMMIT)
        complete = self._rollback_prepared_quietly()
        log.warning("gid=%s rolled back: Kafka %s (%s)", gid,
                    "produce failed" if before else "commit aborted", result.detail)
        raise RolledBack(
            f"Kafka {'produce' if before else 'commit'} failed ({result.detail}); rolled back, "
            "nothing published" + ("" if complete else
                                   "; ROLLBACK PREPARED is left to recovery"),
            gid=gid, phase=Phase.PRODUCE if before else Phase.KAFKA_COMMIT, complete=complete,
        ) from result.error

    def _rollback_prepared_quietly(self) -> bool:
        """ROLLBACK PREPARED after Kafka did not commit. Raises :class:`Diverged`
        if the gid turns out to have been committed by someone else."""
        assert self.gid is not None
        try:
            result = self._finish_prepared(commit=False)
        except psycopg.Error as exc:
            log.error("gid=%s ROLLBACK PREPARED failed (%s); recovery will roll it back",
                      self.gid, describe(exc))
            return False
        if result is _pg.FinishResult.GONE and self._fate() == "committed":
            raise self._diverged(kafka_committed=False)
        return True

    def _fate(self) -> str | None:
        """PostgreSQL's word on this transaction once its gid is gone (or ``None``)."""
        pool = self._coord._pool
        if self._xid is None or pool is None:
            return None
        try:
            with pool.connection(timeout=self._coord.config.connection_timeout) as conn:
                return _pg.xact_status(conn, self._xid)
        except Exception as exc:
            log.error("gid=%s cannot ask PostgreSQL the fate of xid %s: %s", self.gid,
                      self._xid, describe(exc))
            return None

    def _diverged(self, kafka_committed: bool) -> Diverged:
        what = ("committed in Kafka but rolled back in PostgreSQL" if kafka_committed
                else "rolled back in Kafka but committed in PostgreSQL")
        log.critical("gid=%s DIVERGED: %s (xid %s). This is a bug; reconcile by hand",
                     self.gid, what, self._xid)
        return Diverged(f"the two sides diverged: {what}", gid=self.gid,
                        phase=Phase.PG_COMMIT, kafka_committed=kafka_committed)

    def _finish_prepared(self, commit: bool) -> _pg.FinishResult:
        pool = self._coord._pool
        assert pool is not None and self.gid is not None
        first = self._conn
        if first is not None and (first.closed or
                                  first.info.transaction_status != TransactionStatus.IDLE):
            first = None
        return _pg.finish_prepared(
            lambda: pool.getconn(timeout=self._coord.config.connection_timeout),
            pool.putconn, self.gid, commit, self._coord.config.pg_commit_retry, first,
        )

    def _finish_commit(self) -> None:
        gid = self.gid
        try:
            result = self._finish_prepared(commit=True)
        except Exception as exc:
            log.error("gid=%s COMMITTED in Kafka but COMMIT PREPARED failed (%s); recovery "
                      "will commit the PostgreSQL side", gid, describe(exc))
            raise CommittedPendingRecovery(
                f"the transaction is committed (Kafka commit point passed), but COMMIT "
                f"PREPARED failed ({describe(exc)}); the recovery worker will commit the "
                "PostgreSQL side. Do not retry the operation",
                gid=gid, phase=Phase.PG_COMMIT) from exc
        if result is _pg.FinishResult.GONE:
            # Gone is not success on its own: ask PostgreSQL what became of it.
            fate = self._fate()
            if fate == "aborted":
                raise self._diverged(kafka_committed=True)
            if fate != "committed":
                log.error("gid=%s COMMIT PREPARED found the gid gone and PostgreSQL cannot "
                          "tell the fate of xid %s (%s)", gid, self._xid, fate)
                raise OutcomeUnknown(
                    "committed in Kafka, but COMMIT PREPARED found the gid gone and "
                    f"PostgreSQL cannot tell what became of it (xid {self._xid}: {fate})",
                    gid=gid, phase=Phase.PG_COMMIT)
            log.info("gid=%s was already committed by another session", gid)
        self._protocol.fire(Event.PG_COMMITTED)
        log.debug("gid=%s committed", gid)


def _to_bytes(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _to_bytes_opt(v: str | bytes | None) -> bytes | None:
    return None if v is None else _to_bytes(v)



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
