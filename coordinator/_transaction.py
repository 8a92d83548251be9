"""One coordinated transaction: the context manager the user's block runs in.

The steps are the protocol's (``_protocol.py``); this module does the I/O
around them. Every error the caller can get is built in ``_outcomes.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import psycopg
from confluent_kafka import KafkaException
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from . import _postgres
from ._committer import Ticket
from ._consumed import ConsumedBatch, rewind
from ._enums import Phase, Status, Step
from ._errmap import describe, is_connection_error, pg_prepare_error
from ._kafka import KafkaResult, StagedMessage
from ._outcomes import (
    TopicUnusable,
    after_kafka_error,
    before_prepare_reason,
    committed_pending,
    rolled_back,
    unavailable,
)
from ._protocol import Event, Protocol, Then
from .decision_log import DecisionRecord
from .errors import (
    Diverged,
    OutcomeUnknown,
    RolledBack,
    UsageError,
)
from .gid import Gid
from .prepared import Connection, Finish, xact_status

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["Transaction"]

log = logging.getLogger("coordinator")

Query = str | bytes | sql.SQL | sql.Composed
Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


class Transaction:
    """One coordinated transaction. Use it as a context manager from
    :meth:`Coordinator.transaction`; inside the block, write with
    :meth:`execute` (or :attr:`connection`) and :meth:`produce`.

    Never call ``commit()`` or ``rollback()`` on :attr:`connection`: the
    coordinator ends the transaction. Savepoints (``connection.transaction()``)
    are fine.
    """

    def __init__(self, coordinator: Coordinator, idempotency_key: str | None,
                 consumed: ConsumedBatch | None = None) -> None:
        self._coord = coordinator
        self._consumed = consumed
        self._group_metadata: Any = None
        self.idempotency_key = idempotency_key
        self.txid = uuid.uuid4().hex
        self._gid: Gid | None = None
        self._protocol = Protocol()
        self._conn: Connection | None = None
        self._conn_autocommit = False
        self._messages: list[StagedMessage] = []
        self._xid: int | None = None

    @property
    def status(self) -> Status:
        return self._protocol.status

    @property
    def gid(self) -> str | None:
        """The PostgreSQL gid, known once the transaction reaches PREPARE."""
        return None if self._gid is None else str(self._gid)

    @property
    def connection(self) -> Connection:
        """The psycopg connection of this transaction (inside the block only)."""
        if self._conn is None or self.status is not Status.ACTIVE:
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
        if self.status is not Status.ACTIVE:
            raise UsageError("produce() is only allowed inside the transaction's block")
        if not topic:
            raise UsageError("produce() needs a topic")
        if topic == self._coord.config.decision_topic.name:
            raise UsageError("produce() to the decision topic is not allowed: only the "
                             "coordinator writes decisions")
        hdrs: tuple[tuple[str, bytes], ...] = ()
        if headers:
            items = headers.items() if isinstance(headers, Mapping) else headers
            hdrs = tuple((str(k), _to_bytes(v)) for k, v in items)
        self._messages.append(
            StagedMessage(topic, _to_bytes_opt(value), _to_bytes_opt(key), hdrs, partition)
        )

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> Self:
        if self.status is not Status.NOT_STARTED:
            raise UsageError("a Transaction can be used only once")
        pool, _ = self._coord._ready()
        if self._consumed is not None:
            # The group generation the batch was consumed under: if the consumer loses
            # its partitions in a rebalance, the commit of these offsets is fenced.
            self._group_metadata = self._consumed.consumer.consumer_group_metadata()
        self._conn = self._begin(pool)
        self._protocol.fire(Event.BEGUN)
        try:
            if self.idempotency_key is not None:
                self._coord._idem.claim(self._conn, self.idempotency_key, self.txid)
        except BaseException as exc:
            self._abandon(Event.BLOCK_FAILED)
            if isinstance(exc, psycopg.Error):
                raise unavailable(exc) from exc
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
                self._protocol.fire(Event.BEGIN_FAILED)
                raise unavailable(exc, "no PostgreSQL connection") from None
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
                self._protocol.fire(Event.BEGIN_FAILED)
                raise unavailable(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status is not Status.ACTIVE:  # __enter__ failed
            return
        if exc is not None:
            self._abandon(Event.BLOCK_FAILED)
            self._rewind()
            log.debug("%s rolled back: the block raised %s", self._log_id,
                      exc_type.__name__ if exc_type else "")
            return  # the block's exception propagates unchanged
        try:
            self._commit()
        except BaseException:
            if self._is_rolled_back:
                self._rewind()  # the batch is delivered again
            raise
        finally:
            self._release()

    @property
    def _is_rolled_back(self) -> bool:
        return self._protocol.status is Status.ROLLED_BACK

    def _rewind(self) -> None:
        if self._consumed is not None:
            rewind(self._consumed.consumer, self._consumed.first,
                   self._coord.config.kafka_timeout)

    def _abandon(self, event: Event) -> None:
        """Roll PostgreSQL back (if still open), record ``event``, release the connection."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # a broken connection rolls back on its own
        self._protocol.fire(event)
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                conn.autocommit = self._conn_autocommit
        except psycopg.Error:
            pass
        pool = self._coord._pool
        if pool is not None:
            pool.putconn(conn)

    def _step(self, step: Step) -> None:
        hook = self._coord.config.on_step
        if hook is not None:
            hook(step, self.gid)

    # -- the protocol ------------------------------------------------------

    def _commit(self) -> None:
        coord = self._coord
        conn = self._conn
        assert conn is not None
        state = conn.info.transaction_status
        if state != TransactionStatus.INTRANS:
            self._abandon(Event.BLOCK_FAILED)
            if state == TransactionStatus.INERROR:
                raise rolled_back("a statement inside the block failed", Phase.EXECUTE)
            raise UsageError("the block ended the PostgreSQL transaction itself (commit() or "
                             "rollback() on tx.connection); its work is NOT coordinated",
                             phase=Phase.EXECUTE)
        if not self._messages and self._consumed is None:
            self._commit_one_phase(conn)
            return
        _, committer = coord._ready()
        try:
            coord._check_topics({m.topic for m in self._messages})
            ticket = committer.join(coord.config.connection_timeout)
        except (TimeoutError, KafkaException, TopicUnusable) as exc:
            self._abandon(Event.FAILED_BEFORE_COMMIT)
            raise rolled_back(before_prepare_reason(exc), Phase.PRODUCE,
                               gid=self._log_id) from None
        try:
            self._prepare(conn, ticket)
            self._step(Step.AFTER_PREPARE)
        except BaseException:
            ticket.cancel()  # the slot is free again; whatever is prepared stays in doubt
            raise
        self._protocol.fire(Event.KAFKA_STARTED)
        consumed = (None if self._consumed is None
                    else self._consumed.offsets(self._group_metadata))
        result = ticket.commit(self._messages, DecisionRecord(str(self._gid)), consumed)
        self._after_kafka(result)

    def _commit_one_phase(self, conn: Connection) -> None:
        """No Kafka message: a plain COMMIT is the whole protocol."""
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._abandon(Event.BLOCK_FAILED)
            if is_connection_error(exc):  # not class 40: a deadlock is a rollback
                raise OutcomeUnknown(
                    f"connection lost during COMMIT (no Kafka message): {describe(exc)}",
                    phase=Phase.PG_COMMIT) from exc
            raise RolledBack(f"COMMIT failed: {describe(exc)}", phase=Phase.PG_COMMIT) from exc
        self._protocol.fire(Event.ONE_PHASE_COMMITTED)

    def _prepare(self, conn: Connection, ticket: Ticket) -> None:
        coord = self._coord
        self._gid = gid = Gid.new(coord.name, coord.instance, ticket.slot.index,
                                  ticket.slot.decision_partition, ticket.session.floor,
                                  coord.decision_log.fingerprint)
        self._step(Step.BEFORE_PREPARE)
        try:
            if self.idempotency_key is not None:
                coord._idem.record_gid(conn, self.idempotency_key, str(gid))
            self._xid = _postgres.prepare(conn, str(gid))
        except (psycopg.Error, _postgres.NotPrepared) as exc:
            self._abandon(Event.PREPARE_FAILED)
            if is_connection_error(exc):
                # The PREPARE may have happened (or still be running on the server) when
                # the connection broke; no decision was written, so the only possible
                # outcome is rollback. "Gone" proves nothing here: a PREPARE still in
                # progress is not visible yet, and recovery will roll it back.
                done = self._rollback_prepared() is Finish.DONE
                raise rolled_back(f"connection lost at PREPARE ({describe(exc)})",
                                   Phase.PREPARE, gid=str(gid), complete=done) from exc
            if isinstance(exc, _postgres.NotPrepared):
                self._rollback_prepared()  # cannot be prepared; costs nothing to be sure
                raise RolledBack(str(exc), gid=str(gid), phase=Phase.PREPARE) from None
            raise pg_prepare_error(exc, str(gid)) from exc
        self._protocol.fire(Event.PREPARED)
        log.debug("gid=%s prepared", gid)

    def _after_kafka(self, result: KafkaResult) -> None:
        """The protocol says what follows the Kafka transaction's outcome; do it."""
        gid = str(self._gid)
        step = self._protocol.after_kafka(result.outcome)
        if step.then is Then.COMMIT_PREPARED:
            log.debug("gid=%s Kafka committed in %.1f ms", gid, result.commit_seconds * 1e3)
            try:
                self._step(Step.AFTER_KAFKA_COMMIT)
            except Exception as exc:  # committed all the same: say so
                raise committed_pending(exc, gid) from exc
            self._finish_commit()
            return
        complete = True
        if step.then is Then.ROLLBACK_PREPARED:
            complete = self._rollback_prepared() is not None
            log.warning("gid=%s rolled back: Kafka %s (%s)", gid, step.phase.value,
                        result.detail)
        else:
            log.error("gid=%s Kafka commit outcome unknown (%s); PostgreSQL left prepared "
                      "for recovery", gid, result.detail)
        assert step.error is not None
        raise after_kafka_error(step.error, result, gid, step.phase, complete) from result.error

    def _rollback_prepared(self) -> Finish | None:
        """ROLLBACK PREPARED after Kafka did not commit; ``None`` when it failed
        (recovery will do it). Raises :class:`Diverged` if the gid turns out to
        have been committed by someone else."""
        try:
            result = self._finish_prepared(commit=False)
        except Exception as exc:
            log.error("gid=%s ROLLBACK PREPARED failed (%s); recovery will roll it back",
                      self.gid, describe(exc))
            return None
        if result is Finish.GONE and self._fate() == "committed":
            raise self._diverged(kafka_committed=False)
        return result

    def _finish_commit(self) -> None:
        try:
            result = self._finish_prepared(commit=True)
        except Exception as exc:
            log.error("gid=%s COMMITTED in Kafka but COMMIT PREPARED failed (%s); recovery "
                      "will commit the PostgreSQL side", self.gid, describe(exc))
            raise committed_pending(exc, self.gid) from exc
        if result is Finish.GONE:
            # Gone is not success on its own: ask PostgreSQL what became of it.
            fate = self._fate()
            if fate == "aborted":
                raise self._diverged(kafka_committed=True)
            if fate != "committed":
                log.error("gid=%s COMMIT PREPARED found the gid gone and PostgreSQL cannot "
                          "tell the fate of xid %s (%s)", self.gid, self._xid, fate)
                raise OutcomeUnknown(
                    "committed in Kafka, but COMMIT PREPARED found the gid gone and "
                    f"PostgreSQL cannot tell what became of it (xid {self._xid}: {fate})",
                    gid=self.gid, phase=Phase.PG_COMMIT)
            log.info("gid=%s was already committed by another session", self.gid)
        self._protocol.fire(Event.PG_COMMITTED)
        log.debug("gid=%s committed", self.gid)

    def _finish_prepared(self, commit: bool) -> Finish:
        pool = self._coord._pool
        assert pool is not None and self._gid is not None
        first = self._conn
        if first is not None and (first.closed or
                                  first.info.transaction_status != TransactionStatus.IDLE):
            first = None
        return _postgres.finish_prepared(
            lambda: pool.getconn(timeout=self._coord.config.connection_timeout),
            pool.putconn, str(self._gid), commit, self._coord.config.pg_commit_retry, first,
        )

    def _fate(self) -> str | None:
        """PostgreSQL's word on this transaction once its gid is gone (or ``None``)."""
        pool = self._coord._pool
        if self._xid is None or pool is None:
            return None
        try:
            with pool.connection(timeout=self._coord.config.connection_timeout) as conn:
                return xact_status(conn, self._xid)
        except Exception as exc:
            log.error("gid=%s cannot ask PostgreSQL the fate of xid %s: %s", self.gid,
                      self._xid, describe(exc))
            return None

    def _diverged(self, kafka_committed: bool) -> Diverged:
        self._protocol.fire(Event.DIVERGED)
        what = ("committed in Kafka but rolled back in PostgreSQL" if kafka_committed
                else "rolled back in Kafka but committed in PostgreSQL")
        log.critical("gid=%s DIVERGED: %s (xid %s). This is a bug; reconcile by hand",
                     self.gid, what, self._xid)
        return Diverged(f"the two sides diverged: {what}", gid=self.gid,
                        phase=Phase.PG_COMMIT, kafka_committed=kafka_committed)


def _to_bytes(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _to_bytes_opt(v: str | bytes | None) -> bytes | None:
    return None if v is None else _to_bytes(v)
