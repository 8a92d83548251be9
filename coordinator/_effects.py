"""The I/O a coordinated transaction asks for, as values.

The protocol's steps (``_txcore.py``) are generators: they ``yield`` an
effect -- run this statement, make this blocking Kafka call, sleep, call the
step hook -- and receive its result (or have its exception thrown in). The
synchronous driver (``_transaction.py``) performs each effect on the spot;
the asyncio driver (``_atransaction.py``) awaits psycopg's async connection
and runs blocking Kafka calls in worker threads. One copy of the protocol,
two thin drivers: the design of psycopg 3's own generators.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from ._enums import Step

__all__ = [
    "Acquire",
    "Blocking",
    "Effect",
    "Execute",
    "Flow",
    "FlushSession",
    "Hook",
    "NoConnection",
    "Release",
    "Result",
    "Sleep",
    "drive",
    "execute_async",
    "execute_sync",
    "run_now",
    "run_on",
]

T = TypeVar("T")

Query = str | bytes | sql.SQL | sql.Composed


@dataclass(frozen=True, slots=True)
class Result:
    """One result set of an :class:`Execute`: the command tag and its rows."""

    status: str | None
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Execute:
    """Run ``query`` and return a list of :class:`Result` (one per statement).

    ``on_pool=False``: on the transaction's connection. ``on_pool=True``: on
    any pooled connection in autocommit mode (finishing a gid, asking
    PostgreSQL a transaction's fate), taken and given back by the driver.
    """

    query: Query
    params: Any = None
    on_pool: bool = False


@dataclass(frozen=True, slots=True)
class Blocking:
    """A blocking call (Kafka, a consumer): made directly by the synchronous
    driver, in a worker thread by the asyncio driver."""

    call: Callable[[], Any]
    waits_for_others: bool = False
    """The call may wait for other transactions to make progress (for a free
    producer slot): the asyncio driver runs it apart from the calls those
    transactions need, so that waiters cannot starve them of threads."""
    undo: Callable[[Any], None] | None = None
    """Given the call's result if it arrives after the driver stopped waiting
    for it (the asyncio task running the flow was cancelled): gives back what
    the call took (a producer slot's ticket)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` between retries. ``sleep`` is the retry policy's own
    (a test may inject one); the asyncio driver awaits ``asyncio.sleep``
    when it is the default ``time.sleep``."""

    seconds: float
    sleep: Callable[[float], None] = field(compare=False)


@dataclass(frozen=True, slots=True)
class Hook:
    """Call the configured step hook (a test seam) with ``step`` and the gid."""

    step: Step
    gid: str | None


@dataclass(frozen=True, slots=True)
class Acquire:
    """Take a pooled connection for the transaction, idle and in autocommit
    mode. Raises :class:`NoConnection` (pool exhausted or closed) or a
    ``psycopg.Error`` (a broken connection, already given back)."""


@dataclass(frozen=True, slots=True)
class Release:
    """Give the transaction's connection back to its pool (its autocommit
    setting restored)."""


@dataclass(frozen=True, slots=True)
class FlushSession:
    """Flush the transaction's ORM session (``tx.session``) into its
    PostgreSQL transaction: ``Session.flush()``, or awaited
    ``AsyncSession.flush()``."""


Effect = Execute | Blocking | Sleep | Hook | Acquire | Release | FlushSession
Flow = Generator[Effect, Any, T]


class NoConnection(Exception):
    """The pool gave no connection (timeout, closed)."""


def execute_sync(conn: psycopg.Connection[Any], e: Execute) -> list[Result]:
    with conn.cursor() as cur:
        cur.execute(e.query, e.params)
        return _results(cur)


async def execute_async(conn: psycopg.AsyncConnection[Any], e: Execute) -> list[Result]:
    async with conn.cursor() as cur:
        await cur.execute(e.query, e.params)
        out = []
        while True:
            rows = await cur.fetchall() if cur.description is not None else []
            out.append(Result(cur.statusmessage, list(rows)))
            if not cur.nextset():
                return out


def _results(cur: psycopg.Cursor[Any]) -> list[Result]:
    out = []
    while True:
        rows = cur.fetchall() if cur.description is not None else []
        out.append(Result(cur.statusmessage, list(rows)))
        if not cur.nextset():
            return out


E = TypeVar("E")


async def drive(flow: Generator[E, Any, T], perform: Callable[[E], Awaitable[Any]]) -> T:
    """Run ``flow``, performing each effect it yields with ``perform`` (whose
    result is sent back in, or its exception thrown in). Nothing here is the
    consume loop's own: any flow of effects can be driven so."""
    try:
        effect = next(flow)
        while True:
            try:
                result = await perform(effect)
            except BaseException as exc:
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (the synchronous driver's
    :func:`drive`: every ``perform`` does its work on the spot)."""
    try:
        coro.send(None)
    except StopIteration as end:
        return end.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a synchronous driver suspended")


def run_on(conn: psycopg.Connection[Any], flow: Flow[T]) -> T:
    """Run a flow that only executes statements, on one synchronous connection."""

    async def perform(effect: Effect) -> Any:  # never suspends
        assert isinstance(effect, Execute), effect
        return execute_sync(conn, effect)

    return run_now(drive(flow, perform))
