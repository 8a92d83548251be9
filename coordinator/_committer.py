"""How a prepared transaction reaches the Kafka commit point.

A committer hands out a :class:`Ticket` before PREPARE -- the ticket fixes the
producer slot and its session (so the gid, and the only producer that may
commit it) -- and, once PostgreSQL has prepared, commits the
transaction's messages and decision record in a Kafka transaction.
:class:`PerOperationCommitter` runs one Kafka transaction per operation;
the group committer (``_group.py``) shares one among concurrent operations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from ._kafka import ConsumedOffsets, KafkaResult, StagedMessage, run_transaction
from ._producers import ProducerPool, ProducerSlot, Session
from .config import RetryPolicy
from .decision_log import DecisionRecord

__all__ = ["Committer", "PerOperationCommitter", "Ticket"]


class Ticket(Protocol):
    @property
    def slot(self) -> ProducerSlot: ...

    @property
    def session(self) -> Session: ...

    def commit(
        self, messages: Sequence[StagedMessage], decision: DecisionRecord,
        consumed: ConsumedOffsets | None = None,
    ) -> KafkaResult: ...

    def cancel(self) -> None: ...


class Committer(Protocol):
    def join(self, timeout: float) -> Ticket:
        """A ticket for one transaction, taken before its PREPARE.

        Starts the slot's producer session when it has none, so Kafka being
        unreachable fails the transaction before anything is prepared.
        Raises ``TimeoutError`` (no slot free) or ``KafkaException``.
        """
        ...

    def join_now(self) -> Ticket | None:
        """:meth:`join` when it needs no waiting (a slot is free and has a
        producer session), else ``None``: never blocks, so the asyncio driver
        calls it on the event loop and only goes to a worker thread for
        :meth:`join` when it returns ``None``."""
        ...


class _PerOpTicket:
    def __init__(self, owner: PerOperationCommitter, slot: ProducerSlot,
                 timeout: float, session: Session | None = None) -> None:
        self._owner = owner
        self.slot = slot
        self._done = False
        if session is not None:
            self.session = session
            return
        try:
            self.session = slot.session(time.monotonic() + timeout)
        except BaseException:
            self.cancel()
            raise

    def commit(self, messages: Sequence[StagedMessage], decision: DecisionRecord,
               consumed: ConsumedOffsets | None = None) -> KafkaResult:
        try:
            return run_transaction(
                self.slot, messages, [decision], self._owner.decision_topic,
                self._owner.commit_retry, self._owner.timeout, decision.gid,
                generation=self.session.generation,
                consumed=() if consumed is None else (consumed,),
            )
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._owner.pool.release(self.slot)


class PerOperationCommitter:
    """One Kafka transaction per operation; the producer is held from PREPARE
    to the Kafka commit, then released before ``COMMIT PREPARED``."""

    def __init__(
        self, pool: ProducerPool, decision_topic: str, commit_retry: RetryPolicy, timeout: float
    ) -> None:
        self.pool = pool
        self.decision_topic = decision_topic
        self.commit_retry = commit_retry
        self.timeout = timeout

    def join(self, timeout: float) -> Ticket:
        deadline = time.monotonic() + timeout
        slot = self.pool.acquire(timeout)
        return _PerOpTicket(self, slot, max(0.0, deadline - time.monotonic()))

    def join_now(self) -> Ticket | None:
        slot = self.pool.try_acquire()
        if slot is None:
            return None
        session = slot.current_session()
        if session is None:
            self.pool.release(slot)
            return None
        return _PerOpTicket(self, slot, 0.0, session)
