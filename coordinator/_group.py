"""Group commit: transactions that reach the commit point together share one
Kafka transaction.

Each transaction is assigned a producer slot and its current producer session
before PREPARE (the slot is part of its gid; only that session may commit it)
and, once PostgreSQL has prepared it, deposits its messages and
decision record with that slot's batcher. The first depositor leads: it waits
briefly for the other transactions already assigned to the slot (at most
``max_wait``, at most ``max_batch`` members), then commits one Kafka
transaction carrying everything and hands each member the shared result.
Members that fail before depositing (their PREPARE failed) simply withdraw,
so they never hold a batch back. A lone transaction does not wait at all.
Members whose session was replaced meanwhile (a batch before them failed and
the producer was re-created) are not committed: they fail before the commit
point and are rolled back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._committer import Ticket
from ._kafka import ConsumedOffsets, KafkaResult, StagedMessage, run_transaction
from ._producers import ProducerPool, ProducerSlot, Session
from ._protocol import KafkaOutcome
from .config import GroupCommit, RetryPolicy
from .decision_log import DecisionRecord

__all__ = ["GroupCommitter"]


@dataclass(eq=False)
class _Member:
    messages: Sequence[StagedMessage]
    decision: DecisionRecord
    generation: int
    consumed: ConsumedOffsets | None
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
    def __init__(self, owner: GroupCommitter, batcher: _SlotBatcher, timeout: float,
                 session: Session | None = None) -> None:
        self._owner = owner
        self._batcher = batcher
        self.slot = batcher.slot
        self._done = False
        self.session: Session
        if session is not None:
            self.session = session
            return
        try:
            self.session = batcher.slot.session(time.monotonic() + timeout)
        except BaseException:
            self.cancel()
            raise

    def commit(self, messages: Sequence[StagedMessage], decision: DecisionRecord,
               consumed: ConsumedOffsets | None = None) -> KafkaResult:
        if self._done:
            raise RuntimeError("ticket already used")
        self._done = True
        return self._owner._commit(
            self._batcher, _Member(messages, decision, self.session.generation, consumed))

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
        return _GroupTicket(self, batcher, timeout)

    def join_now(self) -> Ticket | None:
        with self._lock:
            batcher = min(self._batchers, key=lambda b: b.load)
            session = batcher.slot.current_session()
            if session is None:
                return None
            with batcher.cond:
                batcher.outstanding += 1
        return _GroupTicket(self, batcher, 0.0, session)

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
        # This thread leads the next batch (b.committing is set on its behalf).
        with b.cond:
            deadline = time.monotonic() + self.group.max_wait
            while b.outstanding > 0 and len(b.queue) < self.group.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                b.cond.wait(left)
            batch = b.queue[: self.group.max_batch]
            del b.queue[: len(batch)]
        # Only members of the slot's current session may commit in this batch; the
        # others took their session before a failure replaced it (run_transaction
        # checks the generation again under the slot's lock).
        current = b.slot.generation
        stale = [m for m in batch if m.generation != current]
        for m in stale:
            m.result = KafkaResult(
                KafkaOutcome.FAILED_BEFORE_COMMIT, None,
                f"the producer session taken before PREPARE (generation {m.generation}) "
                f"was replaced (now {current}); only that session may commit")
        members = [m for m in batch if m.result is None]
        result: KafkaResult | None = None
        try:
            if members:
                assert current is not None
                result = run_transaction(
                    b.slot,
                    [m for member in members for m in member.messages],
                    [member.decision for member in members],
                    self.decision_topic,
                    self.commit_retry,
                    self.timeout,
                    members[0].decision.gid if len(members) == 1
                    else f"{members[0].decision.gid} (+{len(members) - 1} in group)",
                    generation=current,
                    consumed=[m.consumed for m in members if m.consumed is not None],
                )
                result.members = len(members)
        except BaseException as exc:
            result = KafkaResult(KafkaOutcome.UNKNOWN, exc, f"unexpected: {exc!r}")
            raise
        finally:
            with b.cond:
                for member in members:
                    member.result = result
                for member in batch:
                    if member is not me:
                        member.wake.release()
                if b.queue:  # hand the lead to the next waiting member
                    b.queue[0].wake.release()
                else:
                    b.committing = False
        assert me.result is not None
        return me.result
