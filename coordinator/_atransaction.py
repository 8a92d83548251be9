"""The asyncio driver of a coordinated transaction: awaits the effects the
protocol's steps (``_txcore.py``) ask for.

PostgreSQL is psycopg's async connection; Kafka calls (which block) and the
step hook run in the coordinator's worker threads, so the event loop never
waits on them.

Cancellation: a task cancelled inside the block rolls back like any other
exception of the block. Once the block has ended, the commit procedure (and
the rollback of a failed block) is shielded: cancelled during PREPARE or the
Kafka commit, it still runs to its end, so the outcome is decided exactly as
without the cancellation (never a half-commit, never a guessed outcome). Then
the coroutine raises the ``CancelledError``, as a cancelled task must: its
``__cause__`` is the typed error (``RolledBack``, ``OutcomeUnknown``, ...) when
the transaction did not commit, and :attr:`status` tells the outcome either
way (``COMMITTED`` when it did).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psycopg

from ._effects import (
    Acquire,
    Blocking,
    Effect,
    Execute,
    Flow,
    FlushSession,
    Hook,
    Release,
    Sleep,
    drive,
    execute_async,
)
from ._transaction import Query
from ._txcore import TransactionCore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._acoordinator import AsyncCoordinator

__all__ = ["AsyncConnection", "AsyncTransaction", "to_the_end"]

T = TypeVar("T")
AsyncConnection = psycopg.AsyncConnection[tuple[object, ...]]


class AsyncTransaction(TransactionCore):
    """One coordinated transaction on an event loop. Use it as an async context
    manager from :meth:`AsyncCoordinator.transaction`; inside the block, write
    with ``await tx.execute(...)`` (or :attr:`connection`) and :meth:`produce`.
    """

    _coord: AsyncCoordinator
    _in_flight = 0
    """Statements of :meth:`execute` past their check and not yet answered."""
    _calls_done: asyncio.Event | None = None
    """Set when the last of them ends, while the block's end waits for them."""

    @property
    def connection(self) -> AsyncConnection:
        """The psycopg async connection of this transaction (inside the block only)."""
        conn: AsyncConnection = self._active_connection()
        return conn

    @property
    def session(self) -> AsyncSession:
        """An SQLAlchemy ``AsyncSession`` on this transaction's connection (inside
        the block only; the coordinator must be made with ``postgres=`` an
        ``AsyncEngine``). It is flushed before PREPARE; ``await session.commit()``
        only flushes: the coordinator ends the transaction."""
        session: AsyncSession = self._orm_session()
        return session

    async def execute(self, query: Query,
                      params: Any = None) -> psycopg.AsyncCursor[tuple[object, ...]]:
        """Execute a statement in the transaction; returns the cursor. A statement
        another task still has in flight when the block ends is waited for (it is
        part of the transaction); one started after it is refused."""
        conn = self.connection  # the check
        self._in_flight += 1
        try:
            return await conn.execute(query, params)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._calls_done is not None:
                self._calls_done.set()

    async def __aenter__(self) -> Self:
        await self._drive(self._enter_flow())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The rollback of a failed block is shielded too: cancelled half-way, it
        # would leave the connection out of its pool. A cancelled task ends
        # cancelled, whatever the outcome (asyncio.timeout, TaskGroup and shutdown
        # rely on it; a retry loop catching RolledBack must not swallow it). The
        # outcome: tx.status, and the typed error as the cause.
        await to_the_end(self._end(self._exit_flow(exc)))

    async def _end(self, flow: Flow[None]) -> None:
        """The block's end, once the statements other tasks had in flight when it
        ended are answered (psycopg's connection lock is first come, first served;
        the block is marked ended, so later ones are refused): the procedure then
        sees the transaction as they left it."""
        conn = self._conn
        if self._in_flight:  # statements of other tasks, past their check
            self._calls_done = asyncio.Event()
            await self._calls_done.wait()
        if conn is not None:  # and any on the connection itself (its lock is FIFO)
            async with conn.lock:
                pass
        await self._drive(flow)

    # -- the driver ----------------------------------------------------------

    async def _drive(self, flow: Flow[T]) -> T:
        return await drive(flow, self._perform)

    async def _perform(self, effect: Effect) -> Any:
        coord = self._coord
        match effect:
            case Execute(on_pool=False):
                return await execute_async(self._conn, effect)
            case Execute():
                async with coord._borrow() as conn:
                    return await execute_async(conn, effect)
            case Blocking(call, waits_for_others, undo):
                return await coord._in_thread(call, waits_for_others, undo)
            case Sleep(seconds, sleep):
                if sleep is time.sleep:
                    await asyncio.sleep(seconds)
                else:
                    sleep(seconds)  # a test's own sleep
            case Hook(step, gid):
                hook = coord.config.on_step
                assert hook is not None
                await coord._in_thread(lambda: hook(step, gid))
            case Acquire():
                self._conn_pool, _ = coord._ready()  # the pool _acquire takes it from
                conn, self._conn_autocommit = await coord._acquire()
                return conn
            case FlushSession():
                await self._session.flush()
            case Release():
                if self._session is not None:
                    session, self._session = self._session, None
                    await session.close()  # leaves the transaction alone (rollback_only)
                if self._conn is not None:  # to its own pool, even if the coordinator closed
                    await coord._give_back(self._conn, self._conn_autocommit, self._conn_pool)
            case _:  # pragma: no cover
                raise AssertionError(effect)
        return None


async def to_the_end(step: Awaitable[T]) -> T:
    """Await ``step`` to its end even if the awaiting task is cancelled meanwhile:
    the cancellation is held back until then, and the task then ends cancelled,
    with the step's error, if any, as the cause."""
    task = asyncio.ensure_future(step)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            # wait() neither cancels the task nor raises its error.
            await asyncio.wait((task,))
        except asyncio.CancelledError as stop:
            cancelled = stop  # the step runs to its end all the same
    error = task.exception()
    if cancelled is not None:
        if error is not None:
            raise cancelled from error
        raise cancelled
    if error is not None:
        raise error
    return task.result()
