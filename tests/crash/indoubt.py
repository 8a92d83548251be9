"""Make in-doubt transactions in-process, fast: a coordinator that "crashes" at the commit.

:func:`install` wraps ``coordinator._committer.run_transaction`` (the Kafka side of
the per-operation committer). While a thread has set a crash mode with :func:`crashing`,
its next transaction ends in a :class:`SimulatedCrash` (a ``BaseException``, so nothing
in the coordinator catches it) after ``PREPARE TRANSACTION``:

``"before_commit"``
    raised before the Kafka transaction starts: no decision record, nothing published;
    the right resolution is ROLLBACK PREPARED;
``"after_commit"``
    raised after the Kafka transaction (messages + decision record) committed; the right
    resolution is COMMIT PREPARED.

Either way the PostgreSQL transaction stays prepared, exactly as after a ``kill -9`` at
that point (the producer is still usable, as a restarted one would be).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import coordinator._committer
from coordinator import Coordinator
from coordinator._protocol import KafkaOutcome

__all__ = ["MODES", "SimulatedCrash", "crashing", "install", "make_in_doubt"]

MODES = ("before_commit", "after_commit")

_local = threading.local()
_real: Callable[..., Any] | None = None


class SimulatedCrash(BaseException):
    """The coordinator "died" at the Kafka commit; the gid is left prepared."""

    def __init__(self, gid: str, mode: str) -> None:
        super().__init__(f"simulated crash {mode} of {gid}")
        self.gid = gid
        self.mode = mode


def _run_transaction(*args: Any, **kwargs: Any) -> Any:
    assert _real is not None
    mode = getattr(_local, "mode", None)
    if mode is None:
        return _real(*args, **kwargs)
    decisions = args[2] if len(args) > 2 else kwargs["decisions"]
    gid = decisions[0].gid
    if mode == "before_commit":
        raise SimulatedCrash(gid, mode)
    result = _real(*args, **kwargs)
    if result.outcome is not KafkaOutcome.COMMITTED:
        return result  # a real failure: let the coordinator handle it
    raise SimulatedCrash(gid, mode)


def install() -> Callable[[], None]:
    """Wrap the committer's ``run_transaction`` (idempotent); returns an undo function."""
    global _real
    if _real is None:
        _real = coordinator._committer.run_transaction  # type: ignore[attr-defined]
        coordinator._committer.run_transaction = _run_transaction  # type: ignore[attr-defined]

    def undo() -> None:
        global _real
        if _real is not None:
            coordinator._committer.run_transaction = _real  # type: ignore[attr-defined]
            _real = None

    return undo


@contextlib.contextmanager
def crashing(mode: str) -> Iterator[None]:
    """In this thread, the next transactions crash at ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if _real is None:
        raise RuntimeError("call install() first")
    old = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = old


def make_in_doubt(coord: Coordinator, mode: str, sql_text: Any, params: Any,
                  messages: list[tuple[str, bytes, bytes]]) -> str:
    """Run one transaction (``sql_text`` with ``params``, then ``messages`` as
    ``(topic, key, value)``) that crashes at ``mode``; return its gid (left prepared)."""
    with crashing(mode):
        try:
            with coord.transaction() as tx:
                tx.execute(sql_text, params)
                for topic, key, value in messages:
                    tx.produce(topic, value=value, key=key)
        except SimulatedCrash as crash:
            return crash.gid
    raise AssertionError(f"transaction {tx.gid} did not reach the simulated crash "
                         f"(status {tx.status})")
