"""Group commit: transactions that reach the commit point together share one
Kafka transaction.

Each transaction is assigned a producer slot before PREPARE (the slot is part
of its gid) and, once PostgreSQL has prepared it, deposits its messages and
decision record with that slot's batcher. The first depositor leads: it opens
the Kafka transaction at once, produces what has been deposited, and keeps
taking in the other transactions already assigned to the slot as they deposit
(for at most ``max_wait``, at most ``max_batch`` members), so that waiting for
them overlaps the transaction's first round trips; then it commits the one
Kafka transaction carrying everything and hands each member the shared result.
Members deposited while a batch commits form the next batch, led by the first
of them. Each member sleeps on its own lock, so only the threads concerned wake.
Members that fail before depositing (their PREPARE failed) simply withdraw,
so they never hold a batch back. A lone transaction does not wait at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ._committer import Ticket
from ._kafka import (
    KafkaOutcome,
    KafkaResult,
    ProducerPool,
    ProducerSlot,
    StagedMessage,
    run_transaction,
)
from .config import GroupCommit, RetryPolicy
from .decision_log import DecisionRecord

__all__ = ["GroupCommitter"]


@dataclass(eq=False)
class _Member:
    messages: Sequence[StagedMessage]
    decision: DecisionRecord
    result: KafkaResult | None = None
    wake: threading.Lock = field(default_factory=threading.Lock)
    """Held while the member sleeps; released (once) when its result is set or
    when it is handed the lead. Each member waits on its own lock, so a deposit
    or a finished batch wakes exactly the threads concerned, not every waiter
    of the slot."""


@dataclass(eq=False)
class _SlotBatcher:
    slot: ProducerSlot
    cond: threading.Condition = field(default_factory=threading.Condition)
    outstanding: int = 0
    """Tickets handed out for this slot that have not deposited or withdrawn."""
    queue: list[_Member] = field(default_factory=list)
    committing: bool = False

    @property
    def load(self) -> int:
        return self.outstanding + len(self.queue) + (1 if self.committing else 0)


class _GroupTicket:
    def __init__(self, owner: GroupCommitter, batcher: _SlotBatcher) -> None:
        self._owner = owner
        self._batcher = batcher
        self.slot = batcher.slot
        self._done = False

    def commit(self, messages: Sequence[StagedMessage], decision: DecisionRecord) -> KafkaResult:
        if self._done:
            raise RuntimeError("ticket already used")
        self._done = True
        return self._owner._commit(self._batcher, _Member(messages, decision))

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            b = self._batcher
            with b.cond:
                b.outstanding -= 1
                b.cond.notify_all()


class GroupCommitter:
    """Batches concurrent transactions per producer slot into shared Kafka transactions."""

    def __init__(
        self,
        pool: ProducerPool,
        decision_topic: str,
        commit_retry: RetryPolicy,
        timeout: float,
        group: GroupCommit,
    ) -> None:
        self._batchers = [_SlotBatcher(slot) for slot in pool.slots]
        self._lock = threading.Lock()
        self.decision_topic = decision_topic
        self.commit_retry = commit_retry
        self.timeout = timeout
        self.group = group

    def join(self, timeout: float) -> Ticket:
        with self._lock:
            batcher = min(self._batchers, key=lambda b: b.load)
            with batcher.cond:
                batcher.outstanding += 1
        return _GroupTicket(self, batcher)

    def close(self) -> None:
        pass

    def _commit(self, b: _SlotBatcher, me: _Member) -> KafkaResult:
        me.wake.acquire()
        with b.cond:
            b.outstanding -= 1
            b.queue.append(me)
            lead = not b.committing and b.queue[0] is me
            if lead:
                b.committing = True
            else:
                b.cond.notify_all()  # only a leader collecting a batch waits on cond
        if not lead:
            me.wake.acquire()  # until our result is in, or the lead is handed to us
            if me.result is not None:
                return me.result
        # This thread leads the next batch (b.committing is set on its behalf). It opens
        # the Kafka transaction at once and keeps adding members that deposit meanwhile
        # (see _stream), so the wait for them overlaps the transaction's first round trips.
        with b.cond:
            batch = b.queue[: self.group.max_batch]
            del b.queue[: len(batch)]
        stream = self._stream(b, batch, time.monotonic() + self.group.max_wait)
        result: KafkaResult | None = None
        try:
            result = run_transaction(
                b.slot,
                stream,
                _Decisions(stream, batch),
                self.decision_topic,
                self.commit_retry,
                self.timeout,
                f"{me.decision.gid} (group)" if b.outstanding or b.queue else me.decision.gid,
            )
        except BaseException as exc:
            result = KafkaResult(KafkaOutcome.UNKNOWN, exc, f"unexpected: {exc!r}")
            raise
        finally:
            stream.close()
            with b.cond:
                for member in batch:
                    member.result = result
                    if member is not me:
                        member.wake.release()
                if b.queue:  # hand the lead to the next waiting member
                    b.queue[0].wake.release()
                else:
                    b.committing = False
        return result

    def _stream(
        self, b: _SlotBatcher, batch: list[_Member], deadline: float
    ) -> Iterator[StagedMessage]:
        """The messages of ``batch``, then of the members that deposit while they are
        produced, until no member is outstanding, ``max_wait`` has passed or the batch
        is full. A member joins ``batch`` (and the transaction's outcome) only here."""
        done = 0
        while True:
            while done < len(batch):
                yield from batch[done].messages
                done += 1
            if len(batch) >= self.group.max_batch:
                return
            with b.cond:
                while not b.queue:
                    left = deadline - time.monotonic()
                    if b.outstanding <= 0 or left <= 0:
                        return
                    b.cond.wait(left)
                more = b.queue[: self.group.max_batch - len(batch)]
                del b.queue[: len(more)]
            batch.extend(more)


class _Decisions:
    """The decision records of a batch, read once its messages are all produced."""

    def __init__(self, stream: Iterator[StagedMessage], batch: list[_Member]) -> None:
        self._stream = stream
        self._batch = batch

    def __iter__(self) -> Iterator[DecisionRecord]:
        for _ in self._stream:  # already exhausted when run_transaction gets here
            pass
        return iter([member.decision for member in self._batch])
