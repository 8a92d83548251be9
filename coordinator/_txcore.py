"""One coordinated transaction, free of I/O: what to do, in which order, and
what each outcome means.

The decisions are the protocol's (``_protocol.py``); this module strings them
together as generators that yield effects (``_effects.py``) for a driver to
perform: :class:`~coordinator.Transaction` performs them synchronously,
:class:`~coordinator.AsyncTransaction` on an event loop. Every error the caller
can get is built in ``_outcomes.py``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import psycopg
from confluent_kafka import KafkaException
from psycopg.pq import TransactionStatus

from . import _postgres
from ._committer import Ticket
from ._consumed import ConsumedBatch, rewind
from ._effects import (
    Acquire,
    Blocking,
    Execute,
    Flow,
    FlushSession,
    Hook,
    NoConnection,
    Release,
)
from ._enums import Phase, Status, Step
from ._errmap import describe, is_connection_error, pg_prepare_error
from ._kafka import KafkaResult, StagedMessage
from ._logging import log_extra
from ._observing import TxObservers
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
    AlreadyCommitted,
    Diverged,
    Error,
    OutcomeUnknown,
    RolledBack,
    UsageError,
)
from .gid import Gid
from .prepared import Finish, xact_status_flow

if TYPE_CHECKING:
    from ._base import CoordinatorBase

__all__ = ["Headers", "TransactionCore"]

log = logging.getLogger("coordinator")

Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


class TransactionCore:
    """State and steps shared by the synchronous and the asyncio transaction."""

    def __init__(self, coordinator: CoordinatorBase, idempotency_key: str | None,
                 consumed: ConsumedBatch | None = None) -> None:
        self._coord = coordinator
        self._consumed = consumed
        self._group_metadata: Any = None
        self.idempotency_key = idempotency_key
        self.txid = uuid.uuid4().hex
        self._gid: Gid | None = None
        self._protocol = Protocol()
        self._conn: Any = None
        """The driver's psycopg connection (sync or async) while the transaction holds one."""
        self._conn_autocommit = False
        self._staging: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        """Held while a message is checked and staged (the sync driver's lock
        against the block's end, for calls from other threads)."""
        self._conn_pool: Any = None
        """The pool ``_conn`` came from (it goes back there)."""
        self._session: Any = None
        """The ORM session of ``tx.session`` (an engine's coordinator), once asked for."""
        self._messages: list[StagedMessage] = []
        self._block_ended = False
        """The block is over: nothing more may run in or be added to the transaction
        (its status stays ACTIVE until PREPARE, and then the connection is idle in
        autocommit mode: a statement would be committed on its own)."""
        self._xid: int | None = None
        self._obs = TxObservers(())

    @property
    def status(self) -> Status:
        return self._protocol.status

    @property
    def gid(self) -> str | None:
        """The PostgreSQL gid, known once the transaction reaches PREPARE."""
        return None if self._gid is None else str(self._gid)

    @property
    def _log_id(self) -> str:
        return self.gid or f"(txid {self.txid})"

    def _extra(self, phase: Phase | None = None) -> dict[str, object]:
        return log_extra(gid=self.gid, phase=phase, name=self._coord.name,
                         instance=self._coord.instance)

    def _active_connection(self) -> Any:
        if self._conn is None or self.status is not Status.ACTIVE or self._block_ended:
            raise UsageError("the transaction's connection is only available inside the block")
        return self._conn

    def produce(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Stage a message; it is produced in the Kafka transaction at commit."""
        with self._staging:
            self._stage(topic, value, key, headers, partition)

    def _stage(self, topic: str, value: bytes | str | None, key: bytes | str | None,
               headers: Headers | None, partition: int | None) -> None:
        if self.status is not Status.ACTIVE or self._block_ended:
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
        hdrs += self._obs.headers()
        self._messages.append(
            StagedMessage(topic, _to_bytes_opt(value), _to_bytes_opt(key), hdrs, partition)
        )

    # -- entering the block --------------------------------------------------

    def _enter_flow(self) -> Flow[None]:
        if self.status is not Status.NOT_STARTED:
            raise UsageError("a Transaction can be used only once")
        coord = self._coord
        coord._ready()
        if self._consumed is not None:
            # The group generation the batch was consumed under: if the consumer loses
            # its partitions in a rebalance, the commit of these offsets is fenced.
            self._group_metadata = self._consumed.consumer.consumer_group_metadata()
        # Observers are told of the transaction only once nothing can fail before
        # the try blocks below, which always tell them how it ended.
        self._obs = coord._observers.transaction(
            self.txid, self.idempotency_key,
            () if self._consumed is None else self._consumed.headers)
        try:
            yield from self._begin()
        except BaseException as exc:
            self._ended(exc)
            raise
        self._protocol.fire(Event.BEGUN)
        try:
            if self.idempotency_key is not None:
                yield from coord._idem.claim(self.idempotency_key, self.txid)
        except BaseException as exc:
            yield from self._abandon(Event.BLOCK_FAILED)
            if isinstance(exc, AlreadyCommitted):
                coord._observers.idempotency_hit()
            if isinstance(exc, psycopg.Error):
                error = unavailable(exc)
                self._ended(error)
                raise error from exc
            self._ended(exc)
            raise
        self._obs.phase(Phase.BEGIN)

    def _begin(self) -> Flow[None]:
        """Take a pooled connection and BEGIN on it.

        A pooled connection found broken (the server restarted, the network
        dropped) is discarded and another one taken: nothing was done yet.
        """
        attempts = max(2, min(self._coord._pool_max_size(), 5))
        for attempt in range(attempts):
            try:
                self._conn = yield Acquire()
                yield Execute("BEGIN")
                return
            except NoConnection as exc:
                self._protocol.fire(Event.BEGIN_FAILED)
                raise unavailable(exc.__cause__ or exc, "no PostgreSQL connection") from None
            except psycopg.Error as exc:
                yield from self._release()  # the pool discards a broken connection
                if is_connection_error(exc) and attempt + 1 < attempts:
                    log.info("discarding a broken pooled connection (%s)", describe(exc),
                             extra=self._extra(Phase.BEGIN))
                    continue
                self._protocol.fire(Event.BEGIN_FAILED)
                raise unavailable(exc) from exc
            except BaseException:
                # Cancelled (or interrupted) at BEGIN: the connection goes back all the same.
                yield from self._release()
                self._protocol.fire(Event.BEGIN_FAILED)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- leaving the block -------------------------------------------------

    def _exit_flow(self, exc: BaseException | None) -> Flow[None]:
        self._block_ended = True  # now, not when a driver first runs the flow
        return self._exit_steps(exc)

    def _exit_steps(self, exc: BaseException | None) -> Flow[None]:
        if self.status is not Status.ACTIVE:  # entering failed
            return
        if exc is not None:
            try:
                yield from self._abandon(Event.BLOCK_FAILED)
                yield from self._rewind()
            finally:  # even when interrupted meanwhile: observers hear the end
                self._ended(exc, Phase.EXECUTE)
            log.debug("%s rolled back: the block raised %s", self._log_id,
                      type(exc).__name__, extra=self._extra(Phase.EXECUTE))
            return  # the block's exception propagates unchanged
        try:
            yield from self._commit()
        except BaseException as error:
            if self._protocol.status is Status.ACTIVE:
                # Failed before PREPARE took effect, in no way of the protocol's own (the
                # coordinator closed meanwhile, an interrupt): nothing can commit, roll back.
                yield from self._abandon(Event.BLOCK_FAILED)
                if self._gid is not None:
                    yield from self._rollback_prepared()  # no decision can exist for it
            if self._protocol.status is Status.ROLLED_BACK:
                yield from self._rewind()  # the batch is delivered again
            self._ended(error)
            raise
        finally:
            yield from self._release()
        self._ended(None)

    def _ended(self, error: BaseException | None, phase: Phase | None = None) -> None:
        if phase is None and isinstance(error, Error):
            phase = error.phase
        self._obs.end(self.status, phase, error)

    def _rewind(self) -> Flow[None]:
        batch = self._consumed
        if batch is not None:
            timeout = self._coord.config.kafka_timeout
            extra = self._extra()
            yield Blocking(lambda: rewind(batch.consumer, batch.first, timeout, extra))

    def _abandon(self, event: Event) -> Flow[None]:
        """Roll PostgreSQL back (if still open), record ``event``, release the connection."""
        conn = self._conn
        try:
            if (conn is not None and not conn.closed
                    and conn.info.transaction_status != TransactionStatus.IDLE):
                yield Execute("ROLLBACK")
        except psycopg.Error:
            pass  # a broken connection rolls back on its own
        finally:
            # Even when cancelled during the ROLLBACK: the pool rolls back what is left.
            self._protocol.fire(event)
            yield from self._release()

    def _release(self) -> Flow[None]:
        if self._conn is not None:
            yield Release()
            self._conn = None

    def _step(self, step: Step) -> Flow[None]:
        if self._coord.config.on_step is not None:
            yield Hook(step, self.gid)

    # -- the protocol ------------------------------------------------------

    def _commit(self) -> Flow[None]:
        coord = self._coord
        _, committer = coord._ready()  # closed meanwhile: nothing commits, even in one phase
        conn = self._conn
        assert conn is not None
        state = conn.info.transaction_status
        if not conn.autocommit:  # see _sqlalchemy._on_rollback
            yield from self._abandon(Event.BLOCK_FAILED)
            raise UsageError("the block ended the PostgreSQL transaction through its ORM "
                             "session (session.rollback(), or a flush that failed); "
                             "everything is rolled back, nothing published",
                             phase=Phase.EXECUTE)
        if state != TransactionStatus.INTRANS:
            yield from self._abandon(Event.BLOCK_FAILED)
            if state == TransactionStatus.INERROR:
                raise rolled_back("a statement inside the block failed", Phase.EXECUTE)
            raise UsageError("the block ended the PostgreSQL transaction itself (commit() or "
                             "rollback() on tx.connection); its work is NOT coordinated",
                             phase=Phase.EXECUTE)
        yield from self._before_prepare()
        if not self._messages and self._consumed is None:
            yield from self._commit_one_phase()
            return
        topics = {m.topic for m in self._messages}
        timeout = coord.config.connection_timeout
        try:
            if not topics <= coord._known_topics:  # else nothing to ask Kafka
                yield Blocking(lambda: coord._check_topics(topics))
            ticket: Ticket | None = committer.join_now()  # never waits
            if ticket is None:
                ticket = yield Blocking(lambda: committer.join(timeout),
                                        waits_for_others=True, undo=_cancel_ticket)
            assert ticket is not None
        except (TimeoutError, KafkaException, TopicUnusable) as exc:
            yield from self._abandon(Event.FAILED_BEFORE_COMMIT)
            raise rolled_back(before_prepare_reason(exc), Phase.PRODUCE,
                               gid=self._log_id) from None
        try:
            yield from self._prepare(ticket)
            yield from self._step(Step.AFTER_PREPARE)
        except BaseException:
            ticket.cancel()  # the slot is free again; whatever is prepared stays in doubt
            raise
        self._protocol.fire(Event.KAFKA_STARTED)
        consumed = (None if self._consumed is None
                    else self._consumed.offsets(self._group_metadata))
        messages, decision = self._messages, DecisionRecord(str(self._gid))
        self._obs.phase_start()
        result: KafkaResult = yield Blocking(lambda: ticket.commit(messages, decision, consumed))
        self._obs.phase(Phase.KAFKA_COMMIT)
        self._obs.group(result.members)
        yield from self._after_kafka(result)

    def _before_prepare(self) -> Flow[None]:
        """Flush the ORM session, if the block used one, before the transaction
        ends: its pending changes belong to the transaction. A failure to flush
        is a failure of the block's work: everything rolls back."""
        if self._session is None:
            return
        try:
            yield FlushSession()
        except Exception as exc:
            yield from self._abandon(Event.BLOCK_FAILED)
            raise rolled_back(f"flushing the ORM session failed: {describe(exc)}",
                              Phase.EXECUTE) from exc

    def _orm_session(self) -> Any:
        """``tx.session``: made on first use, bound to the transaction's connection."""
        conn = self._active_connection()
        if self._session is None:
            make = getattr(self._coord._pool, "session", None)
            if make is None:
                raise UsageError("tx.session needs a coordinator made with postgres= an "
                                 "SQLAlchemy engine (on the psycopg driver)",
                                 phase=Phase.EXECUTE)
            self._session = make(conn)
        return self._session

    def _commit_one_phase(self) -> Flow[None]:
        """No Kafka message: a plain COMMIT is the whole protocol."""
        try:
            yield Execute("COMMIT")
        except psycopg.Error as exc:
            unknown = is_connection_error(exc)  # not class 40: a deadlock is a rollback
            yield from self._abandon(
                Event.ONE_PHASE_OUTCOME_UNKNOWN if unknown else Event.BLOCK_FAILED)
            if unknown:
                raise OutcomeUnknown(
                    f"connection lost during COMMIT (no Kafka message): {describe(exc)}",
                    phase=Phase.PG_COMMIT) from exc
            raise RolledBack(f"COMMIT failed: {describe(exc)}", phase=Phase.PG_COMMIT) from exc
        self._protocol.fire(Event.ONE_PHASE_COMMITTED)
        self._obs.phase(Phase.PG_COMMIT)

    def _prepare(self, ticket: Ticket) -> Flow[None]:
        coord = self._coord
        self._gid = gid = Gid.new(coord.name, coord.instance, ticket.slot.index,
                                  ticket.slot.decision_partition, ticket.session.floor,
                                  coord.decision_log.fingerprint)
        yield from self._step(Step.BEFORE_PREPARE)
        self._obs.phase_start()
        try:
            if self.idempotency_key is not None:
                yield from coord._idem.record_gid(self.idempotency_key, str(gid))
            self._xid = yield from _postgres.prepare(str(gid))
        except (psycopg.Error, _postgres.NotPrepared) as exc:
            self._obs.phase(Phase.PREPARE)
            yield from self._abandon(Event.PREPARE_FAILED)
            if is_connection_error(exc):
                # The PREPARE may have happened (or still be running on the server) when
                # the connection broke; no decision was written, so the only possible
                # outcome is rollback. "Gone" proves nothing here: a PREPARE still in
                # progress is not visible yet, and recovery will roll it back.
                done = (yield from self._rollback_prepared()) is Finish.DONE
                raise rolled_back(f"connection lost at PREPARE ({describe(exc)})",
                                   Phase.PREPARE, gid=str(gid), complete=done) from exc
            if isinstance(exc, _postgres.NotPrepared):
                yield from self._rollback_prepared()  # cannot be prepared; costs nothing
                raise RolledBack(str(exc), gid=str(gid), phase=Phase.PREPARE) from None
            raise pg_prepare_error(exc, str(gid)) from exc
        self._obs.phase(Phase.PREPARE)
        self._obs.prepared(str(gid))
        self._protocol.fire(Event.PREPARED)
        if log.isEnabledFor(logging.DEBUG):  # the fields cost more than the call
            log.debug("gid=%s prepared", gid, extra=self._extra(Phase.PREPARE))

    def _after_kafka(self, result: KafkaResult) -> Flow[None]:
        """The protocol says what follows the Kafka transaction's outcome; do it."""
        gid = str(self._gid)
        step = self._protocol.after_kafka(result.outcome)
        if step.then is Then.COMMIT_PREPARED:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gid=%s Kafka committed in %.1f ms", gid, result.commit_seconds * 1e3,
                          extra=self._extra(Phase.KAFKA_COMMIT))
            try:
                yield from self._step(Step.AFTER_KAFKA_COMMIT)
            except Exception as exc:  # committed all the same: say so
                raise committed_pending(exc, gid) from exc
            yield from self._finish_commit()
            return
        complete = True
        if step.then is Then.ROLLBACK_PREPARED:
            complete = (yield from self._rollback_prepared()) is not None
            log.warning("gid=%s rolled back: Kafka %s (%s)", gid, step.phase.value,
                        result.detail, extra=self._extra(step.phase))
        else:
            # Recovery decides it from the decision log: nothing for a human to do yet.
            log.warning("gid=%s Kafka commit outcome unknown (%s); PostgreSQL left prepared "
                        "for recovery", gid, result.detail, extra=self._extra(step.phase))
        assert step.error is not None
        raise after_kafka_error(step.error, result, gid, step.phase, complete) from result.error

    def _rollback_prepared(self) -> Flow[Finish | None]:
        """ROLLBACK PREPARED after Kafka did not commit; ``None`` when it failed
        (recovery will do it). Raises :class:`Diverged` if the gid turns out to
        have been committed by someone else."""
        try:
            result = yield from self._finish_prepared(commit=False)
        except Exception as exc:
            log.warning("gid=%s ROLLBACK PREPARED failed (%s); recovery will roll it back",
                        self.gid, describe(exc), extra=self._extra(Phase.PG_COMMIT))
            return None
        if result is Finish.GONE and (yield from self._fate()) == "committed":
            raise self._diverged(kafka_committed=False)
        return result

    def _finish_commit(self) -> Flow[None]:
        self._obs.phase_start()
        try:
            result = yield from self._finish_prepared(commit=True)
        except Exception as exc:
            log.warning("gid=%s COMMITTED in Kafka but COMMIT PREPARED failed (%s); recovery "
                        "will commit the PostgreSQL side", self.gid, describe(exc),
                        extra=self._extra(Phase.PG_COMMIT))
            raise committed_pending(exc, self.gid) from exc
        finally:
            self._obs.phase(Phase.PG_COMMIT)
        if result is Finish.GONE:
            # Gone is not success on its own: ask PostgreSQL what became of it.
            fate = yield from self._fate()
            if fate == "aborted":
                raise self._diverged(kafka_committed=True)
            if fate != "committed":
                log.error("gid=%s COMMIT PREPARED found the gid gone and PostgreSQL cannot "
                          "tell the fate of xid %s (%s)", self.gid, self._xid, fate,
                          extra=self._extra(Phase.PG_COMMIT))
                raise OutcomeUnknown(
                    "committed in Kafka, but COMMIT PREPARED found the gid gone and "
                    f"PostgreSQL cannot tell what became of it (xid {self._xid}: {fate})",
                    gid=self.gid, phase=Phase.PG_COMMIT)
            log.info("gid=%s was already committed by another session", self.gid,
                     extra=self._extra(Phase.PG_COMMIT))
        self._protocol.fire(Event.PG_COMMITTED)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gid=%s committed", self.gid, extra=self._extra(Phase.PG_COMMIT))

    def _finish_prepared(self, commit: bool) -> Flow[Finish]:
        assert self._gid is not None
        conn = self._conn
        own = (conn is not None and not conn.closed
               and conn.info.transaction_status == TransactionStatus.IDLE)
        return (yield from _postgres.finish_prepared(
            str(self._gid), commit, self._coord.config.pg_commit_retry, own))

    def _fate(self) -> Flow[str | None]:
        """PostgreSQL's word on this transaction once its gid is gone (or ``None``)."""
        if self._xid is None:
            return None
        try:
            return (yield from xact_status_flow(self._xid, on_pool=True))
        except Exception as exc:
            log.error("gid=%s cannot ask PostgreSQL the fate of xid %s: %s", self.gid,
                      self._xid, describe(exc), extra=self._extra(Phase.PG_COMMIT))
            return None

    def _diverged(self, kafka_committed: bool) -> Diverged:
        self._protocol.fire(Event.DIVERGED)
        what = ("committed in Kafka but rolled back in PostgreSQL" if kafka_committed
                else "rolled back in Kafka but committed in PostgreSQL")
        log.critical("gid=%s DIVERGED: %s (xid %s). This is a bug; reconcile by hand",
                     self.gid, what, self._xid, extra=self._extra(Phase.PG_COMMIT))
        return Diverged(f"the two sides diverged: {what}", gid=self.gid,
                        phase=Phase.PG_COMMIT, kafka_committed=kafka_committed)


def _cancel_ticket(ticket: Ticket) -> None:
    ticket.cancel()


def _to_bytes(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _to_bytes_opt(v: str | bytes | None) -> bytes | None:
    return None if v is None else _to_bytes(v)
