"""The synchronous driver of a coordinated transaction: performs the effects
the protocol's steps (``_txcore.py``) ask for, on the spot."""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ._effects import (
    Acquire,
    Blocking,
    Effect,
    Execute,
    Flow,
    FlushSession,
    Hook,
    NoConnection,
    Release,
    Sleep,
    drive,
    execute_sync,
    run_now,
)
from ._txcore import TransactionCore
from .prepared import Connection

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._coordinator import Coordinator

__all__ = ["Transaction"]

CANCEL_SECONDS = 5.0
"""After Ctrl-C at the block's end: how long other threads' statements are
cancelled and waited for before the connection is closed under them."""

T = TypeVar("T")
Query = str | bytes | sql.SQL | sql.Composed


class Transaction(TransactionCore):
    """One coordinated transaction. Use it as a context manager from
    :meth:`Coordinator.transaction`; inside the block, write with
    :meth:`execute` (or :attr:`connection`) and :meth:`produce`.

    Never call ``commit()`` or ``rollback()`` on :attr:`connection`: the
    coordinator ends the transaction. Savepoints (``connection.transaction()``)
    are fine.
    """

    _coord: Coordinator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls = threading.Condition(threading.RLock())
        """Guards the "block still open" check of :meth:`execute` and
        :meth:`produce`, the count of statements in flight and the staging of a
        message. Held only for those short steps, never while a statement runs:
        psycopg's connection lock is never taken under it."""
        self._in_flight = 0
        """Statements of :meth:`execute` past their check and not yet answered."""
        self._staging = self._calls  # produce() from another thread: staged or refused

    @property
    def connection(self) -> Connection:
        """The psycopg connection of this transaction (inside the block only)."""
        conn: Connection = self._active_connection()
        return conn

    @property
    def session(self) -> Session:
        """An SQLAlchemy ORM ``Session`` on this transaction's connection (inside
        the block only; the coordinator must be made with ``postgres=`` an
        ``Engine``). It is flushed before PREPARE; ``session.commit()`` only
        flushes: the coordinator ends the transaction."""
        session: Session = self._orm_session()
        return session

    def execute(self, query: Query, params: Any = None) -> psycopg.Cursor[tuple[object, ...]]:
        """Execute a statement in the transaction; returns the cursor.

        Safe to call from other threads while the block runs: a statement still
        running when the block ends is waited for (it is part of the
        transaction), one started after it is refused with :class:`UsageError`.
        (Statements run directly on :attr:`connection` or :attr:`session` from
        other threads must end before the block does.)"""
        with self._calls:
            conn = self.connection  # the check
            self._in_flight += 1
        try:
            return conn.execute(query, params)
        finally:
            with self._calls:
                self._in_flight -= 1
                if not self._in_flight:
                    self._calls.notify_all()

    def __enter__(self) -> Self:
        self._drive(self._enter_flow())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        flow = self._exit_flow(exc)  # the block is ended: later calls are refused
        try:
            self._wait_for_calls()
            self._drive(flow)
        except BaseException as stop:
            if inspect.getgeneratorstate(flow) != inspect.GEN_CREATED:
                raise  # the procedure ran, and handled it
            # Interrupted before the procedure started: roll back instead, once no
            # other thread's statement can still reach the connection.
            flow.close()
            self._cancel_calls()
            self._drive(self._exit_steps(stop))
            raise

    def _wait_for_calls(self) -> None:
        """Until every call past its check has ended (the block is marked ended)."""
        with self._calls:
            while self._in_flight:
                self._calls.wait()

    def _cancel_calls(self) -> None:
        """After an interrupt: cancel other threads' statements and wait for them,
        at most :data:`CANCEL_SECONDS` (the cancel is sent again each second;
        further interrupts are ignored meanwhile, the first one is raised after
        the rollback), so that the connection is never given back while one of
        them can still run on it. When a statement outlived that (say it waits
        for a stream the block left open) or a cancel may still be on its way,
        the connection is closed instead: the server rolls back, the pool
        discards it, and no late cancel can reach its next user."""
        conn = self._conn
        if conn is None:
            return
        deadline = time.monotonic() + CANCEL_SECONDS
        again, unsure = 0.0, False
        while True:
            try:
                with self._calls:
                    if not self._in_flight or time.monotonic() >= deadline:
                        break
                if time.monotonic() >= again:
                    try:
                        conn.cancel_safe(timeout=1.0)
                    except psycopg.Error:
                        unsure = True
                    again = time.monotonic() + 1.0
                with self._calls:
                    if self._in_flight:
                        self._calls.wait(0.1)
            except BaseException:  # a further Ctrl-C: the first one is raised
                continue
        if unsure or self._in_flight:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # -- the driver ----------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        async def perform(effect: Effect) -> Any:  # never suspends: see run_now
            return self._perform(effect)

        return run_now(drive(flow, perform))

    def _perform(self, effect: Effect) -> Any:
        match effect:
            case Execute(on_pool=False):
                return execute_sync(self._conn, effect)
            case Execute():
                pool, _ = self._coord._ready()
                was: list[bool] = []
                conn = _take(pool, self._coord.config.connection_timeout, was.append)
                try:
                    return execute_sync(conn, effect)
                finally:
                    _give_back(pool, conn, was[0])
            case Blocking(call):
                return call()
            case Sleep(seconds, sleep):
                sleep(seconds)
            case Hook(step, gid):
                hook = self._coord.config.on_step
                assert hook is not None
                hook(step, gid)
            case Acquire():
                pool, _ = self._coord._ready()
                self._conn_pool = pool  # given back there, even if the coordinator closed
                return _take(pool, self._coord.config.connection_timeout,
                             self._remember_autocommit)
            case FlushSession():
                self._session.flush()
            case Release():
                if self._session is not None:
                    session, self._session = self._session, None
                    session.close()  # leaves the transaction alone (rollback_only)
                if self._conn is not None:
                    _give_back(self._conn_pool, self._conn, self._conn_autocommit)
            case _:  # pragma: no cover
                raise AssertionError(effect)
        return None

    def _remember_autocommit(self, value: bool) -> None:
        self._conn_autocommit = value


def _take(pool: Any, timeout: float, remember: Callable[[bool], None]) -> Connection:
    """A pooled connection, idle and in autocommit mode (``remember`` is told
    its autocommit setting, to restore it when it is given back)."""
    try:
        conn: Connection = pool.getconn(timeout=timeout)
    except Exception as exc:
        raise NoConnection(str(exc)) from exc
    remember(conn.autocommit)
    try:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = True
    except psycopg.Error:
        pool.putconn(conn)  # the pool discards a broken connection
        raise
    return conn


def _give_back(pool: Any, conn: Connection, autocommit: bool) -> None:
    try:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            conn.autocommit = autocommit
    except psycopg.Error:
        pass
    pool.putconn(conn)
