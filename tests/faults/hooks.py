"""The workload's hooks, on top of ``tests/crash/worker.py``'s: crash state per thread or
per asyncio task (several client threads or tasks share one coordinator) and producers
that count the decision records of each Kafka transaction."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from tests.crash import worker as crash_worker

__all__ = ["ContextLocal", "CountingProducer", "ThreadState"]


class ContextLocal:
    """``threading.local`` for asyncio tasks: attributes per task, seen (and changed) by
    the worker threads the task's blocking calls run in -- the AsyncCoordinator runs them
    with a copy of the calling task's context, which refers to the same attribute dict.
    Each task calls :meth:`bind` before it sets anything; an attribute never set reads
    as missing (``AttributeError``)."""

    def __init__(self) -> None:
        object.__setattr__(self, "_var", contextvars.ContextVar(f"local-{id(self)}"))

    def bind(self) -> None:
        """Give the calling task (and what it starts from now on) its own attributes."""
        self._var.set({})

    def __getattr__(self, name: str) -> Any:
        values: dict[str, Any] | None = self._var.get(None)
        if values is None or name not in values:
            raise AttributeError(name)
        return values[name]

    def __setattr__(self, name: str, value: Any) -> None:
        values: dict[str, Any] | None = self._var.get(None)
        if values is None:
            values = {}
            self._var.set(values)
        values[name] = value


class ThreadState(crash_worker.CrashState):
    """``tests.crash.worker.CrashState`` with the per-operation fields kept per thread
    (``threading.local``, the default) or per asyncio task (a :class:`ContextLocal` as
    ``local``), so that several threads or tasks can share one coordinator (``--threads``,
    for group commit): each one's hooks see its own operation. Under group commit the
    Kafka commit runs in the thread that leads the batch, so a Kafka crash point fires
    only when the armed operation's thread (or task) leads; the PostgreSQL points always
    fire."""

    _FIELDS: ClassVar[dict[str, Any]] = {
        "op": None, "gid": None, "point": "none", "crash_op": "", "kill_delay_us": 0,
        "pause_seconds": 0.0}

    def __init__(self, out: Any, point: str, crash_op: str, local: Any = None) -> None:
        object.__setattr__(self, "_local", local if local is not None else threading.local())
        super().__init__(out, point, crash_op)

    def bind(self) -> None:
        """Per task: give the calling asyncio task its own fields (a no-op per thread)."""
        if isinstance(self._local, ContextLocal):
            self._local.bind()

    def __getattr__(self, name: str) -> Any:
        if name in ThreadState._FIELDS:
            return getattr(self._local, name, ThreadState._FIELDS[name])
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ThreadState._FIELDS:
            setattr(self._local, name, value)
        else:
            object.__setattr__(self, name, value)


class CountingProducer(crash_worker.CrashingProducer):
    """A crashing producer that counts the decision records produced in each Kafka
    transaction, reported to :attr:`on_transaction` when the transaction reaches its
    commit (whatever its outcome) or its abort. A transaction killed before is not
    counted."""

    on_transaction: Callable[[int], None] | None = None
    """Called with the number of decision records of each transaction."""
    decision_topic = ""
    _open = False
    _decisions = 0

    def begin_transaction(self, *args: Any) -> Any:
        result = super().begin_transaction(*args)
        self._open, self._decisions = True, 0
        return result

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        result = super().produce(topic, *args, **kwargs)  # BufferError: not produced
        if topic == self.decision_topic:
            self._decisions += 1
        return result

    def commit_transaction(self, *args: Any) -> Any:
        try:
            return super().commit_transaction(*args)
        finally:  # once per transaction, retried commits included
            self._ended()

    def abort_transaction(self, *args: Any) -> Any:
        try:
            return super().abort_transaction(*args)
        finally:
            self._ended()

    def _ended(self) -> None:
        if self._open and self._decisions and self.on_transaction is not None:
            self.on_transaction(self._decisions)
        self._open = False
