"""SQLAlchemy engines as the coordinator's connection pool, and the ORM session
of a coordinated transaction.

``Coordinator(postgres=engine)`` and ``AsyncCoordinator(postgres=async_engine)``
take their connections from the engine's own pool: :class:`EnginePool` and
:class:`AsyncEnginePool` give the drivers the few calls of a psycopg_pool pool
they use (``getconn``, ``putconn``, ``connection``, ``max_size``) over it.

Every connection taken for a coordinated transaction is also an SQLAlchemy
``Connection`` with a transaction begun on it (SQLAlchemy emits nothing for
that: the coordinator itself sends ``BEGIN``). The transaction's ORM session
joins that transaction with ``join_transaction_mode="rollback_only"``, so
``session.commit()`` inside the block only flushes, ``session.rollback()`` rolls
the whole PostgreSQL transaction back (the coordinator then reports that the
block ended it), and ``session.close()`` leaves it alone: the coordinator alone
ends the transaction, by PREPARE and COMMIT PREPARED.

SQLAlchemy is imported only when the caller passes an engine (it is then
already imported): the library works without the ``[sqlalchemy]`` extra.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from ._enums import Phase
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy import Connection as SAConnection
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "AsyncEnginePool",
    "EnginePool",
    "async_engine_pool",
    "check_postgres",
    "engine_pool",
]


def _is_engine(obj: object, async_: bool) -> bool:
    if "sqlalchemy" not in sys.modules:  # no engine can exist: do not import it
        return False
    if async_:
        if "sqlalchemy.ext.asyncio" not in sys.modules:
            return False
        from sqlalchemy.ext.asyncio import AsyncEngine
        return isinstance(obj, AsyncEngine)
    from sqlalchemy import Engine
    return isinstance(obj, Engine)


def _check_driver(engine: Any, kind: str) -> None:
    dialect = engine.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise ConfigurationError(
            f"{kind} needs an engine on the psycopg (3) driver, e.g. "
            f"'postgresql+psycopg://...', not {dialect.name}+{dialect.driver}",
            phase=Phase.STARTUP)


def _max_size(engine: Any) -> int:
    pool = engine.pool
    size = pool.size() if hasattr(pool, "size") else 5
    return max(1, int(size))


def _broken(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


def _on_rollback(sa_conn: SAConnection) -> None:
    """SQLAlchemy is about to roll back the transaction of a pooled connection (a
    session's ``rollback()``, or a flush that failed, in ``rollback_only`` mode).

    The coordinator runs the connection in autocommit mode with its own ``BEGIN``,
    so whatever ran after this ROLLBACK would be committed statement by statement,
    outside the coordinated transaction. Roll back now and leave autocommit off:
    later statements stay in a transaction that nobody commits, and the
    coordinator, seeing autocommit off, rolls it back and reports that the block
    ended its transaction.
    """
    dbapi: Any = sa_conn.connection.dbapi_connection
    if dbapi is None or dbapi.closed or not dbapi.autocommit:
        return
    try:
        dbapi.rollback()  # SQLAlchemy's own ROLLBACK then finds nothing to do
        dbapi.autocommit = False
    except Exception:  # a broken connection runs nothing more; SQLAlchemy reports it
        pass


def _watch(sa_conn: SAConnection) -> None:
    from sqlalchemy import event

    event.listen(sa_conn, "rollback", _on_rollback)


def _unwatch(sa_conn: SAConnection) -> None:
    from sqlalchemy import event

    if event.contains(sa_conn, "rollback", _on_rollback):
        event.remove(sa_conn, "rollback", _on_rollback)


def engine_pool(postgres: object) -> EnginePool | None:
    """An :class:`EnginePool` when ``postgres`` is an SQLAlchemy ``Engine``."""
    if not _is_engine(postgres, async_=False):
        return None
    _check_driver(postgres, "Coordinator")
    return EnginePool(postgres)  # type: ignore[arg-type]


def async_engine_pool(postgres: object) -> AsyncEnginePool | None:
    """An :class:`AsyncEnginePool` when ``postgres`` is an SQLAlchemy ``AsyncEngine``."""
    if not _is_engine(postgres, async_=True):
        return None
    _check_driver(postgres, "AsyncCoordinator")
    return AsyncEnginePool(postgres)  # type: ignore[arg-type]


def check_postgres(postgres: object, engine: object, asyncio_: bool) -> None:
    """Refuse a ``postgres=`` the coordinator cannot use, saying what it takes."""
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    pool_type = AsyncConnectionPool if asyncio_ else ConnectionPool
    if engine is not None or isinstance(postgres, str | pool_type):
        return
    kind, other = ("AsyncCoordinator", "Coordinator") if asyncio_ else (
        "Coordinator", "AsyncCoordinator")
    if _is_engine(postgres, async_=not asyncio_):
        hint = f"this kind of engine needs {other}"
    elif isinstance(postgres, AsyncConnectionPool | ConnectionPool):
        hint = f"this kind of pool needs {other}"
    else:
        hint = "see docs/configuration.md"
    raise ConfigurationError(
        f"{kind} needs postgres= as a conninfo string, a psycopg_pool.{pool_type.__name__} "
        f"or an SQLAlchemy {'AsyncEngine' if asyncio_ else 'Engine'}, not "
        f"{type(postgres).__name__} ({hint})", phase=Phase.STARTUP)


class EnginePool:
    """The calls of a psycopg_pool ``ConnectionPool`` the coordinator uses, over
    an SQLAlchemy ``Engine``'s pool (the engine stays the caller's)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_size = _max_size(engine)
        self._out: dict[int, SAConnection] = {}

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        sa_conn = self.engine.connect()  # the engine's pool_timeout applies
        try:
            sa_conn.begin()  # emits nothing; the session joins it
            conn: psycopg.Connection[Any] = sa_conn.connection.driver_connection  # type: ignore[assignment]
            _watch(sa_conn)
        except BaseException:
            sa_conn.close()
            raise
        self._out[id(conn)] = sa_conn
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        sa_conn = self._out.pop(id(conn))
        _unwatch(sa_conn)
        if _broken(conn):
            sa_conn.invalidate()
        try:
            sa_conn.close()  # ROLLBACK only if still in a transaction
        except Exception:
            sa_conn.invalidate()

    def session(self, conn: psycopg.Connection[Any]) -> Session:
        from sqlalchemy.orm import Session

        return Session(bind=self._out[id(conn)], join_transaction_mode="rollback_only")

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """As psycopg_pool's ``connection()``: committed at the end of the block,
        rolled back on error."""
        conn = self.getconn(timeout)
        try:
            try:
                yield conn
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
            conn.commit()
        finally:
            self.putconn(conn)

    def close(self) -> None:
        """The engine is the caller's: nothing to close."""


class AsyncEnginePool:
    """The calls of a psycopg_pool ``AsyncConnectionPool`` the coordinator uses,
    over an SQLAlchemy ``AsyncEngine``'s pool (the engine stays the caller's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.max_size = _max_size(engine.sync_engine)
        self._out: dict[int, SAAsyncConnection] = {}
        sync = engine.sync_engine
        args, kwargs = sync.dialect.create_connect_args(sync.url)
        self.conninfo: str = str(args[0]) if args else ""
        self.kwargs: dict[str, Any] = dict(kwargs)
        """Arguments for a synchronous connection to the same database (start-up)."""

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        sa_conn = await self.engine.connect()
        try:
            await sa_conn.begin()
            raw = await sa_conn.get_raw_connection()
            conn: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
            _watch(sa_conn.sync_connection)  # type: ignore[arg-type]
        except BaseException:
            await sa_conn.close()
            raise
        self._out[id(conn)] = sa_conn
        return conn

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        sa_conn = self._out.pop(id(conn))
        if sa_conn.sync_connection is not None:
            _unwatch(sa_conn.sync_connection)
        if _broken(conn):
            await sa_conn.invalidate()
        try:
            await sa_conn.close()
        except Exception:
            await sa_conn.invalidate()

    def session(self, conn: psycopg.AsyncConnection[Any]) -> AsyncSession:
        from sqlalchemy.ext.asyncio import AsyncSession

        return AsyncSession(bind=self._out[id(conn)], join_transaction_mode="rollback_only")

    @contextlib.asynccontextmanager
    async def connection(
        self, timeout: float | None = None,
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await self.getconn(timeout)
        try:
            try:
                yield conn
            except BaseException:
                if not conn.closed:
                    await conn.rollback()
                raise
            await conn.commit()
        finally:
            await self.putconn(conn)

    async def close(self) -> None:
        """The engine is the caller's: nothing to close."""

