"""The asyncio coordinator: the same protocol, gids, decision log and recovery
as :class:`~coordinator.Coordinator`, on an event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psycopg
from confluent_kafka import Consumer, Message
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from ._aconsume import AsyncHandler, arun_consumer
from ._atransaction import AsyncConnection, AsyncTransaction
from ._base import CoordinatorBase
from ._consumecore import ConsumerStats, ConsumeSettings
from ._effects import NoConnection
from ._enums import Phase
from ._errmap import pg_startup_error
from ._logging import log_extra
from ._sqlalchemy import AsyncEnginePool, async_engine_pool, check_postgres
from .config import CoordinatorConfig
from .errors import UsageError
from .prepared import Connection

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AsyncCoordinator", "AsyncTransaction"]

log = logging.getLogger("coordinator")

T = TypeVar("T")


class AsyncCoordinator(CoordinatorBase):
    """Commits a PostgreSQL transaction and a Kafka transaction together, on an
    event loop::

        async with AsyncCoordinator(postgres=dsn, kafka=conf, name="orders") as coord:
            async with coord.transaction(idempotency_key="order-42") as tx:
                await tx.execute("INSERT INTO orders (id) VALUES (%s)", (42,))
                tx.produce("orders.events", value=b'{"id": 42}')

    ``postgres`` is a conninfo string (the coordinator makes and owns an
    :class:`psycopg_pool.AsyncConnectionPool`) or such a pool (borrowed, not
    closed). Everything else is as for :class:`~coordinator.Coordinator`:
    the same configuration, errors, gids, decision log and recovery.

    The event loop never waits on Kafka: the producers' calls block, so they
    run in two pools of worker threads owned by the coordinator (one for
    transactions waiting for a free producer, one for the Kafka transactions
    themselves). The PostgreSQL start-up checks run once, on a synchronous
    connection in a worker thread; that connection also holds the instance
    lock while the coordinator is open.
    """

    def __init__(
        self,
        postgres: str | AsyncConnectionPool[Any] | AsyncEngine,
        kafka: Mapping[str, Any],
        name: str,
        *,
        instance: str | None = None,
        config: CoordinatorConfig | None = None,
    ) -> None:
        self._engine = async_engine_pool(postgres)
        check_postgres(postgres, self._engine, asyncio_=True)
        super().__init__(postgres, kafka, name, instance=instance, config=config)
        self._pool: AsyncConnectionPool[Any] | AsyncEnginePool | None
        self._kafka_threads: ThreadPoolExecutor | None = None
        self._waiting_threads: ThreadPoolExecutor | None = None

    # -- life cycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> Self:
        """Run the start-up checks, fence older producers of this instance, and
        get ready (see :meth:`Coordinator.open`)."""
        if self._open:
            return self
        cfg = self.config
        group = cfg.group_commit
        # Every member of a group waits in a thread until its batch commits.
        size = cfg.producers * (group.max_batch if group is not None else 1) + 2
        self._kafka_threads = ThreadPoolExecutor(min(size, 1024), f"pk2pc-{self.name}-kafka")
        self._waiting_threads = ThreadPoolExecutor(64, f"pk2pc-{self.name}-wait")
        try:
            await self._open_pool()
            params = await self._startup_params()
            await self._in_thread(lambda: self._startup(params))
            self._open = True
        except BaseException:
            await self._close_resources()
            raise
        log.info("coordinator name=%s instance=%s ready (asyncio; %d producers, decision "
                 "topic %s)", self.name, self.instance, cfg.producers, cfg.decision_topic.name,
                 extra=log_extra(phase=Phase.STARTUP, name=self.name, instance=self.instance))
        return self

    async def close(self) -> None:
        self._open = False
        await self._close_resources()

    async def _open_pool(self) -> None:
        if self._engine is not None:
            self._pool = self._engine
            return
        if isinstance(self._postgres, AsyncConnectionPool):
            self._pool = self._postgres
            return
        self._pool = AsyncConnectionPool(self._postgres, **self._pool_options())
        self._owns_pool = True
        try:
            await self._pool.open(wait=True, timeout=self.config.startup_timeout)
        except Exception as exc:
            raise self._pool_unavailable(exc) from None

    async def _startup_params(self) -> tuple[str, dict[str, Any]]:
        """The pool's conninfo and connection arguments (either may be a function)."""
        assert self._pool is not None
        conninfo: Any = self._pool.conninfo
        kwargs: Any = self._pool.kwargs
        if callable(conninfo):
            conninfo = conninfo()
        if callable(kwargs):
            kwargs = kwargs()
        if inspect.isawaitable(conninfo):
            conninfo = await conninfo
        if inspect.isawaitable(kwargs):
            kwargs = await kwargs
        return str(conninfo), dict(kwargs or {})

    def _connect_sync(self, params: tuple[str, dict[str, Any]]) -> Connection:
        """A synchronous connection to the pool's database, for start-up work."""
        conninfo, kwargs = params
        kwargs = {**kwargs, "autocommit": True,
                  "connect_timeout": max(1, int(self.config.startup_timeout))}
        try:
            return psycopg.Connection.connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            raise pg_startup_error(exc) from None

    def _startup(self, params: tuple[str, dict[str, Any]]) -> None:
        """The start-up shared with the synchronous coordinator (in a worker thread)."""
        conn = self._connect_sync(params)
        try:
            self._startup_postgres(conn)  # may keep conn as the instance lock's session
        finally:
            if conn is not self._lock_conn:
                conn.close()
        self._open_kafka()
        with self._connect_sync(params) as conn:
            self._register_log(conn)

    async def _close_resources(self) -> None:
        def close_sync() -> None:
            self._close_kafka()
            conn = self._unlock_instance()
            if conn is not None:
                conn.close()

        if self._kafka_threads is not None:
            await self._in_thread(close_sync)
        for pool in (self._kafka_threads, self._waiting_threads):
            if pool is not None:
                pool.shutdown(wait=False)
        self._kafka_threads = self._waiting_threads = None
        if self._pool is not None and self._owns_pool:
            await self._pool.close()
        self._pool = None

    # -- transactions -------------------------------------------------------

    def transaction(
        self,
        idempotency_key: str | None = None,
        *,
        consumer: Consumer | None = None,
        consumed: Sequence[Message] | None = None,
    ) -> AsyncTransaction:
        """A new coordinated transaction; use it as an async context manager
        (see :meth:`Coordinator.transaction`)."""
        return AsyncTransaction(self, idempotency_key,
                                self._batch(idempotency_key, consumer, consumed))

    async def run_consumer(
        self,
        consumer: Consumer,
        handle: AsyncHandler,
        *,
        batch_size: int = 500,
        batch_timeout: float = 0.1,
        max_attempts: int = 5,
        dead_letter_topic: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> ConsumerStats:
        """Consume batches and ``await handle(tx, messages)`` each in one coordinated
        transaction that also commits the batch's offsets, until ``stop`` is set:
        :meth:`Coordinator.run_consumer` on the event loop (the same decisions:
        splitting, retries, the dead-letter topic, waiting out unknown outcomes).
        The consumer's calls run in worker threads."""
        settings = ConsumeSettings(batch_size, batch_timeout, max_attempts, dead_letter_topic)
        return await arun_consumer(self, consumer, handle, settings, stop)

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[AsyncConnection]:
        """A connection of the coordinator's pool, for work outside coordinated
        transactions (as psycopg_pool's ``connection()``)."""
        pool, _ = self._ready()
        async with pool.connection(timeout=timeout) as conn:
            yield conn

    async def connect_sync(self) -> Connection:
        """A new synchronous connection (autocommit) to the coordinator's database,
        for blocking tools run in a worker thread (``recovery.arecover_own``).
        The caller closes it."""
        self._ready()
        params = await self._startup_params()
        return await asyncio.to_thread(self._connect_sync, params)

    # -- what the driver (_atransaction.py) needs -----------------------------

    async def _in_thread(self, call: Callable[[], T], waits_for_others: bool = False,
                         undo: Callable[[T], None] | None = None) -> T:
        """``call()`` in a worker thread (see :func:`in_thread`)."""
        threads = self._waiting_threads if waits_for_others else self._kafka_threads
        if threads is None:
            raise UsageError("the coordinator is not open")
        return await in_thread(threads, call, undo,
                               log_extra(name=self.name, instance=self.instance))

    async def _acquire(self) -> tuple[AsyncConnection, bool]:
        """A pooled connection, idle and in autocommit mode, and its autocommit
        setting to restore when it is given back."""
        pool, _ = self._ready()
        try:
            conn: AsyncConnection = await pool.getconn(timeout=self.config.connection_timeout)
        except Exception as exc:
            raise NoConnection(str(exc)) from exc
        was = conn.autocommit
        try:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                await conn.rollback()
            await conn.set_autocommit(True)
        except psycopg.Error:
            await pool.putconn(conn)  # the pool discards a broken connection
            raise
        return conn, was

    async def _give_back(self, conn: AsyncConnection, autocommit: bool,
                         pool: Any = None) -> None:
        """Give ``conn`` back to ``pool`` (the one it came from; default: the
        coordinator's current pool)."""
        with contextlib.suppress(psycopg.Error):
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                await conn.set_autocommit(autocommit)
        pool = pool if pool is not None else self._pool
        if pool is not None:
            await pool.putconn(conn)

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[AsyncConnection]:
        pool, _ = self._ready()
        conn, was = await self._acquire()
        try:
            yield conn
        finally:
            await self._give_back(conn, was, pool)


async def in_thread(threads: Executor, call: Callable[[], T],
                    undo: Callable[[T], None] | None = None,
                    fields: dict[str, object] | None = None) -> T:
    """``call()`` in one of ``threads``, with the task's context variables (as
    ``asyncio.to_thread``). If the awaiting task is cancelled while the call
    runs, its result, when it comes, is given to ``undo`` (a call that had not
    started yet is cancelled and never runs)."""
    context = contextvars.copy_context()
    done = threads.submit(functools.partial(context.run, call))
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        if undo is not None:
            done.add_done_callback(functools.partial(_undo_result, undo, fields or {}))
        raise


def _undo_result(undo: Callable[[Any], None], fields: dict[str, object],
                 done: Future[Any]) -> None:
    """``undo`` the result of a call nobody waits for any more (run by the thread
    that finished it, or at once if it finished already)."""
    if done.cancelled() or done.exception() is not None:
        return
    try:
        undo(done.result())
    except Exception:
        log.exception("giving back the result of an abandoned call failed", extra=fields)
