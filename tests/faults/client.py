"""What the workload's two clients share (``tests/faults/workload.py``: the synchronous
:class:`~coordinator.Coordinator` on threads; ``tests/faults/aworkload.py``: the
:class:`~coordinator.AsyncCoordinator` on asyncio tasks): the hooks, an attempt's
statements, messages and log records, what each answer means, and the order in which a
client's operations and their retries are attempted.

The per-operation state the hooks read (which operation runs, where it is armed) is kept
per thread by the synchronous client and per task by the asynchronous one
(:class:`~tests.faults.hooks.ContextLocal`): the asyncio driver runs the hooks in its
worker threads with the calling task's context.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from coordinator import (
    AlreadyCommitted,
    CommittedPendingRecovery,
    Error,
    IdempotencyKeyBusy,
    OutcomeUnknown,
    Phase,
    RolledBack,
    ServiceUnavailable,
    Step,
)
from tests.crash import worker as crash_worker

from .hooks import ContextLocal, CountingProducer, ThreadState
from .operations import RETRY_AFTER, OpState

__all__ = ["Attempt", "ClientBase", "DeliberateFailure", "Schedule", "classify"]


class DeliberateFailure(Exception):
    """The application's own error inside the block (kind ``raise``)."""


@dataclass
class Attempt:
    """One attempt of an operation, as both clients run it."""

    op: OpState
    number: int
    key: str | None
    armed: str | None
    args: argparse.Namespace

    def insert(self) -> tuple[sql.Composed, tuple[str, int, str]]:
        """The attempt's row: the statement and its parameters."""
        query = sql.SQL("INSERT INTO {} (op_id, attempt, instance) VALUES (%s, %s, %s)"
                        ).format(sql.Identifier(self.args.table))
        return query, (self.op.op, self.number, self.args.instance)

    def messages(self) -> list[str]:
        """The attempt's message values (key: the op id)."""
        out = []
        for n in range(self.args.messages_per_op):
            body: dict[str, Any] = {"op": self.op.op, "n": n, "attempt": self.number}
            if self.op.kind == "oversize" and n == 0:
                body["pad"] = "x" * int(self.args.oversize_bytes)
            out.append(json.dumps(body, sort_keys=True))
        return out


def classify(exc: BaseException | None, inside: bool) -> tuple[str, Phase | None]:
    """What an attempt was told, from what its transaction raised (``None``: nothing), and
    the phase the error names. ``inside``: raised inside the block."""
    if exc is None:
        return "committed", None
    if isinstance(exc, AlreadyCommitted):
        return "already_committed", exc.phase
    if isinstance(exc, CommittedPendingRecovery):
        return "pending", exc.phase
    if isinstance(exc, OutcomeUnknown):
        return "unknown", exc.phase
    if isinstance(exc, IdempotencyKeyBusy):
        return "busy", exc.phase
    if isinstance(exc, RolledBack | ServiceUnavailable):
        # ServiceUnavailable comes from BEGIN only: nothing was done.
        return "rolled_back", exc.phase
    if isinstance(exc, Error):
        return "error", exc.phase
    # Raised inside the block (ours, or the driver's): the coordinator rolled back.
    return ("rolled_back" if inside else "error"), None


class Schedule:
    """One client thread's (or task's) operations: fresh ones in plan order (interrupted
    ones first), each started ``pace`` seconds after the previous one (with several
    threads, on the same clock tick, so that their transactions reach the commit together
    and group commit batches them), retries when due."""

    def __init__(self, ops: list[OpState], pace: float, aligned: bool) -> None:
        self.fresh = collections.deque(sorted(ops, key=lambda o: 0 if o.attempts else 1))
        self.deferred: list[tuple[float, int, OpState]] = []
        self.pace = pace
        self.aligned = aligned
        self._seq = 0

    def next(self) -> tuple[OpState | None, float] | None:
        """``None`` when every operation is final; else the operation to attempt next
        (``None``: none yet) and how long to wait before."""
        if not (self.fresh or self.deferred):
            return None
        now = time.monotonic()
        if self.deferred and self.deferred[0][0] <= now:
            return heapq.heappop(self.deferred)[2], 0.0
        if self.fresh:
            op = self.fresh.popleft()
            wait = 0.0
            if self.pace > 0 and not op.attempts:
                wait = self.pace - time.monotonic() % self.pace if self.aligned else self.pace
            return op, wait
        return None, min(self.deferred[0][0] - now, 0.5)

    def retry(self, op: OpState, told: str) -> None:
        self._seq += 1
        heapq.heappush(self.deferred,
                       (time.monotonic() + RETRY_AFTER.get(told, 1.0), self._seq, op))


class ClientBase:
    """The hooks and records of a client running the plan's operations through one
    coordinator (``tests/faults/workload.py``). ``local`` keeps the current attempt per
    thread (``threading.local``) or per task (:class:`~tests.faults.hooks.ContextLocal`),
    like ``state``."""

    def __init__(self, args: argparse.Namespace, state: ThreadState, ops: list[OpState],
                 local: Any = None) -> None:
        self.args = args
        self.state = state
        self.ops = ops
        self._local = local if local is not None else threading.local()
        self.kafka_sizes: dict[int, int] = {}
        self._sizes_lock = threading.Lock()

    def bind(self) -> None:
        """Per task: give the calling asyncio task its own attempt and hook state (a no-op
        per thread)."""
        self.state.bind()
        if isinstance(self._local, ContextLocal):
            self._local.bind()

    @property
    def current(self) -> tuple[str, int] | None:
        """The attempt this thread (or task) runs: (op id, attempt number)."""
        value: tuple[str, int] | None = getattr(self._local, "current", None)
        return value

    @current.setter
    def current(self, value: tuple[str, int] | None) -> None:
        self._local.current = value

    # -- hooks -----------------------------------------------------------------

    def on_step(self, step: Step, gid: str | None) -> None:
        """``CoordinatorConfig.on_step``: the crash hooks of ``tests/crash/worker.py``, plus
        a record of every gid right before its PREPARE (so that recovery's work can be
        traced to attempts)."""
        if step is Step.BEFORE_PREPARE and self.current is not None:
            op, attempt = self.current
            self.state.emit(event="gid", op=op, attempt=attempt, gid=gid)
        self.state.on_step(step, gid)

    def producer_factory(self, conf: dict[str, Any]) -> CountingProducer:
        """``CoordinatorConfig.producer_factory``: producers with the crash hooks of
        ``tests/crash/worker.py`` that count the decision records per Kafka transaction."""
        producer = crash_worker.crashing_producers(self.state, CountingProducer)(conf)
        assert isinstance(producer, CountingProducer)
        producer.on_transaction = self.count_kafka_transaction
        producer.decision_topic = str(self.args.decision_topic)
        return producer

    def count_kafka_transaction(self, members: int) -> None:
        with self._sizes_lock:
            self.kafka_sizes[members] = self.kafka_sizes.get(members, 0) + 1
            due = sum(self.kafka_sizes.values()) % 20 == 0
        if due:
            self.report_kafka_sizes()

    def report_kafka_sizes(self) -> None:
        with self._sizes_lock:
            sizes = dict(self.kafka_sizes)
        self.state.emit(event="kafka_txns", pid=os.getpid(), sizes=sizes)

    # -- an attempt's bookkeeping ----------------------------------------------

    def begin(self, op: OpState) -> Attempt:
        """Arm the hooks for a new attempt of ``op`` and log it."""
        number = len(op.attempts) + 1
        armed = op.spec.get("crash") if not op.crashed else None
        st = self.state
        st.op, st.gid = op.op, None
        st.crash_op = op.op
        st.point = armed or "none"
        st.kill_delay_us = int(op.spec.get("kill_delay_us") or 0)
        st.pause_seconds = float(op.spec.get("pause_seconds") or 0.0)
        self.current = (op.op, number)
        key = f"op:{op.op}" if op.idem else None
        st.emit(event="attempt", op=op.op, attempt=number, key=key, kind=op.kind, armed=armed,
                t=time.time())
        if op.first_at is None:
            op.first_at = time.monotonic()
        return Attempt(op, number, key, armed, self.args)

    def finish(self, at: Attempt, error: BaseException | None, inside: bool,
               gid: str | None, status: str) -> str:
        """Log what the attempt was told; returns it."""
        told, phase = classify(error, inside)
        self.current = None
        st = self.state
        if at.armed is not None and at.armed.startswith("pause:") and st.point == "none":
            at.op.crashed = True  # the pause happened (once per operation)
        st.emit(event="result", op=at.op.op, attempt=at.number, told=told,
                error=None if error is None else type(error).__name__,
                detail=None if error is None else str(error)[:300],
                phase=None if phase is None else str(phase.value),
                gid=gid, status=status, t=time.time())
        return told

    def settle(self, schedule: Schedule, op: OpState, told: str) -> None:
        """Record the attempt's answer: the operation's final answer, or a retry."""
        op.attempts.append(told)
        final = op.final()
        if final is None:
            schedule.retry(op, told)
            return
        self.state.emit(event="op", op=op.op, told=final, attempts=len(op.attempts),
                        error=None if final == "committed" else op.attempts[-1])

    def schedules(self) -> list[Schedule]:
        """The plan's operations dealt to ``--threads`` threads (or tasks)."""
        n = max(1, int(self.args.threads))
        return [Schedule(self.ops[i::n], float(self.args.pace), aligned=n > 1)
                for i in range(n)]
