"""The asyncio workload paths (the ``--asyncio`` mode, ``aio_mode.py``): the same
business operation as the main mode (one INSERT of a row and one 1 KB message), done
from asyncio tasks on one event loop.

``async_group``  (h) :class:`~coordinator.AsyncCoordinator` with group commit, on a
                 psycopg ``AsyncConnectionPool``: ``async with coord.transaction()``,
                 ``await tx.execute(INSERT)``, ``tx.produce(...)``.
``async_naive``  (i) naive dual-write, the sync path (a) (``paths.Naive``) made async:
                 ``await conn.execute(INSERT)`` on a connection of the same kind of
                 pool, COMMIT, then ``produce()`` on one shared idempotent producer
                 (``acks=all``) and await the delivery report. As in (a), the delivery
                 reports are served by a poller thread (off the event loop); it hands
                 each report to the loop with ``call_soon_threadsafe``. Unsafe, like
                 (a): a crash between the two loses the message.

Both paths get a connection pool of the same size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from psycopg_pool import AsyncConnectionPool

from coordinator import AsyncCoordinator, CoordinatorConfig

from .env import COORD_NAME, PAYLOAD, Tables
from .paths import Op
from .txn_count import TxnStats, counting_factory

__all__ = [
    "ASYNC_LABELS",
    "ASYNC_PATHS",
    "AsyncGroup",
    "AsyncNaive",
    "AsyncWorkload",
    "make_async_pool",
]

ASYNC_PATHS = ("async_group", "async_naive")
ASYNC_LABELS = {
    "async_group": "(h) AsyncCoordinator, group commit",
    "async_naive": "(i) async naive dual-write",
}


async def make_async_pool(dsn: str, size: int, name: str) -> AsyncConnectionPool[Any]:
    """An open pool of ``size`` connections (as ``env.make_pool``, async)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=size, max_size=size, open=False, name=name, timeout=60)
    await pool.open(wait=True, timeout=60)
    return pool


class AsyncWorkload:
    """A path the task loop (``aio_loop.py``) drives: :meth:`op` from many tasks at once."""

    name = ""

    async def op(self, op_id: str) -> None:
        raise NotImplementedError

    def begin_measure(self) -> None:
        """Called before each measurement (warm-up included)."""

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> dict[str, float]:
        """Extra figures of a measurement, for the notes."""
        return {}

    async def close(self) -> None:
        pass


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():  # the operation gave up waiting (cancelled)
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(KafkaException(err))


class AsyncNaive(AsyncWorkload):
    """(i) INSERT + COMMIT on the async pool, then produce and await the delivery report."""

    name = "async_naive"

    def __init__(self, pool: AsyncConnectionPool[Any], producer: Producer, tables: Tables,
                 topic: str) -> None:
        self.pool = pool
        self.producer = producer
        self.tables = tables
        self.topic = topic
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="async-naive-poll",
                                        daemon=True)
        self._poller.start()

    @classmethod
    async def open(cls, dsn: str, brokers: str, tables: Tables, topic: str, pool_size: int,
                   producer_conf: dict[str, Any]) -> Self:
        pool = await make_async_pool(dsn, pool_size, "bench-async-naive")
        producer = Producer({
            "bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
            **producer_conf,
        })
        return cls(pool, producer, tables, topic)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def op(self, op_id: str) -> None:
        async with self.pool.connection() as conn:  # commits on leaving the block
            await conn.execute(self.tables.insert_row, (op_id, 1))
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:  # poller thread
            loop.call_soon_threadsafe(_settle, delivered, err)

        while True:
            try:
                self.producer.produce(self.topic, value=PAYLOAD, key=op_id.encode(),
                                      on_delivery=on_delivery)
                break
            except BufferError:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(delivered, 30)

    async def close(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10)
        self._stop.set()
        await asyncio.to_thread(self._poller.join)
        await self.pool.close()


class AsyncGroup(AsyncWorkload):
    """(h) the asyncio coordinator with group commit: one INSERT and one message in a
    coordinated transaction. Its producers count Kafka transactions and the decision
    records in them (``producer_factory``), for the mean group size."""

    name = "async_group"

    def __init__(self, pool: AsyncConnectionPool[Any], coord: AsyncCoordinator,
                 stats: TxnStats, tables: Tables, topic: str) -> None:
        self.pool = pool
        self.coord = coord
        self.stats = stats
        self.tables = tables
        self.topic = topic
        self._before = (0, 0)

    @classmethod
    async def open(cls, dsn: str, brokers: str, tables: Tables, topic: str, pool_size: int,
                   instance: str, config: CoordinatorConfig) -> Self:
        stats = TxnStats()
        config = dataclasses.replace(config, producer_factory=counting_factory(
            stats, config.decision_topic.name))
        pool = await make_async_pool(dsn, pool_size, "bench-async-group")
        coord = AsyncCoordinator(pool, {"bootstrap.servers": brokers}, COORD_NAME,
                                 instance=instance, config=config)
        try:
            await coord.open()
        except BaseException:
            await pool.close()
            raise
        return cls(pool, coord, stats, tables, topic)

    async def op(self, op_id: str) -> None:
        async with self.coord.transaction() as tx:
            await tx.execute(self.tables.insert_row, (op_id, 1))
            tx.produce(self.topic, value=PAYLOAD, key=op_id.encode())

    def begin_measure(self) -> None:
        self._before = self.stats.snapshot()

    def end_measure(self, ops: Sequence[Op], w0: float, w1: float,
                    warmup: float) -> dict[str, float]:
        after = self.stats.snapshot()
        txns = after[0] - self._before[0]
        if not txns:
            return {}
        return {"kafka_txns_per_s": txns / (w1 - w0 + warmup),
                "mean_group_size": (after[1] - self._before[1]) / txns}

    async def close(self) -> None:
        await self.coord.close()
        await self.pool.close()
