"""Make in-doubt transactions in-process, fast: a coordinator that "crashes" at the commit.

:func:`on_step` is an ``on_step`` hook: give it to the coordinator as
``CoordinatorConfig(on_step=indoubt.on_step)``. While a thread has set a crash mode with
:func:`crashing`, its next transaction ends in a :class:`SimulatedCrash` (a
``BaseException``, so nothing in the coordinator catches it) after ``PREPARE
TRANSACTION``:

``"before_commit"``
    raised at ``Step.AFTER_PREPARE``, before the Kafka transaction starts: no decision
    record, nothing published; the right resolution is ROLLBACK PREPARED;
``"after_commit"``
    raised at ``Step.AFTER_KAFKA_COMMIT``, once the Kafka transaction (messages + decision
    record) committed; the right resolution is COMMIT PREPARED.

Either way the PostgreSQL transaction stays prepared, exactly as after a ``kill -9`` at
that point (the producer is still usable, as a restarted one would be). Outside
:func:`crashing` the hook does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from coordinator import Coordinator, Step

__all__ = ["MODES", "SimulatedCrash", "crashing", "make_in_doubt", "on_step"]

MODES = ("before_commit", "after_commit")
_STEP = {"before_commit": Step.AFTER_PREPARE, "after_commit": Step.AFTER_KAFKA_COMMIT}
"""The step each mode crashes at."""

_local = threading.local()


class SimulatedCrash(BaseException):
    """The coordinator "died" at the Kafka commit; the gid is left prepared."""

    def __init__(self, gid: str, mode: str) -> None:
        super().__init__(f"simulated crash {mode} of {gid}")
        self.gid = gid
        self.mode = mode


def on_step(step: Step, gid: str | None) -> None:
    """``CoordinatorConfig.on_step``: raise :class:`SimulatedCrash` at the step of this
    thread's crash mode, if any."""
    mode: str | None = getattr(_local, "mode", None)
    if mode is not None and step is _STEP[mode]:
        assert gid is not None
        raise SimulatedCrash(gid, mode)


@contextlib.contextmanager
def crashing(mode: str) -> Iterator[None]:
    """In this thread, the next transactions crash at ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    old = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = old


def make_in_doubt(coord: Coordinator, mode: str, sql_text: Any, params: Any,
                  messages: list[tuple[str, bytes, bytes]]) -> str:
    """Run one transaction (``sql_text`` with ``params``, then ``messages`` as
    ``(topic, key, value)``) that crashes at ``mode``; return its gid (left prepared).
    ``coord`` must have been made with ``CoordinatorConfig(on_step=indoubt.on_step)``."""
    with crashing(mode):
        try:
            with coord.transaction() as tx:
                tx.execute(sql_text, params)
                for topic, key, value in messages:
                    tx.produce(topic, value=value, key=key)
        except SimulatedCrash as crash:
            return crash.gid
    raise AssertionError(f"transaction {tx.gid} did not reach the simulated crash "
                         f"(status {tx.status}); is the coordinator's on_step "
                         "tests.crash.indoubt.on_step?")
