"""The synchronous driver of a coordinated transaction: performs the effects
the protocol's steps (``_txcore.py``) ask for, on the spot."""

from __future__ import annotations

import threading
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
from ._txcore import Headers, TransactionCore
from .prepared import Connection

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._coordinator import Coordinator

__all__ = ["Transaction"]

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
        self._statements = threading.RLock()
        """Held by :meth:`execute` and :meth:`produce` from their check to their
        end; the block's end marks the block ended, then waits for it: a
        statement or message from another thread is wholly inside the transaction
        or refused, never run after PREPARE or dropped. (psycopg's own connection
        lock is not first come, first served.) Re-entrant: a cursor class may call
        :meth:`execute`."""

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
        running when the block ends is waited for, and one started after it is
        refused with :class:`UsageError`. (Statements run directly on
        :attr:`connection` or :attr:`session` from other threads must end before
        the block does.)"""
        with self._statements:
            return self.connection.execute(query, params)

    def produce(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Stage a message; it is produced in the Kafka transaction at commit.
        From another thread: staged, or refused with :class:`UsageError` once the
        block has ended -- never accepted and then left out."""
        with self._statements:
            super().produce(topic, value, key, headers, partition)

    def __enter__(self) -> Self:
        self._drive(self._enter_flow())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        flow = self._exit_flow(exc)  # the block is ended: later statements are refused
        try:
            with self._statements:  # waits for a statement another thread has in flight
                pass
        except BaseException as stop:  # an interrupt while waiting: roll back
            flow.close()
            self._drive(self._exit_steps(stop))  # queued behind that statement
            raise
        self._drive(flow)

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
