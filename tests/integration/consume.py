"""Helpers of the consume-path tests: input messages, a consumer, the pipeline's tables,
the exactly-once check (each input message -> exactly one row and one output), and the
drivers: one test body runs the consume path through :class:`Coordinator` or
:class:`AsyncCoordinator` (:func:`open_driver`), its handler written once as a *plan*
(the statements and messages a batch gives) that either driver applies to its
transaction."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from coordinator import AsyncCoordinator, AsyncTransaction, ConsumerStats, Status, Transaction

if TYPE_CHECKING:
    from tests.integration.conftest import Env


@dataclass
class Pipeline:
    env: Env
    source: str
    sink: str
    group: str
    partitions: int

    def feed(self, n: int, prefix: str = "m") -> list[str]:
        """Produce ``n`` input messages (keys ``prefix-i``), spread over the partitions."""
        keys = [f"{prefix}-{i}" for i in range(n)]
        producer = Producer({"bootstrap.servers": self.env.bootstrap, "linger.ms": 5})
        for i, key in enumerate(keys):
            producer.produce(self.source, key=key, value=key.encode(),
                             partition=i % self.partitions)
        assert producer.flush(30) == 0
        return keys

    def consumer(self, **overrides: object) -> Consumer:
        conf: dict[str, object] = {
            "bootstrap.servers": self.env.bootstrap, "group.id": self.group,
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500, **overrides}
        c = Consumer(conf)
        c.subscribe([self.source])
        return c

    def plan(self, messages: Sequence[Message]) -> list[Write]:
        """The stage under test: one row and one output message per input message."""
        writes: list[Write] = []
        for m in messages:
            key = (m.key() or b"").decode()
            writes.append(Sql("INSERT INTO invoices (msg_key, src) VALUES (%s, %s)",
                              (key, f"{m.partition()}:{m.offset()}")))
            writes.append(Out(self.sink, key, b"paid " + key.encode()))
        return writes

    def handle(self, tx: Transaction, messages: Sequence[Message]) -> None:
        """:meth:`plan` as a synchronous handler."""
        apply(tx, self.plan(messages))

    def rows(self) -> Counter[str]:
        return Counter(r[0] for r in self.env.execute("SELECT msg_key FROM invoices"))

    def outputs(self) -> Counter[str]:
        return Counter((r.key or b"").decode() for r in self.env.read(self.sink))

    def committed(self) -> dict[int, int]:
        c = Consumer({"bootstrap.servers": self.env.bootstrap, "group.id": self.group,
                      "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(self.source, p) for p in range(self.partitions)],
                              timeout=30)
            return {tp.partition: tp.offset for tp in tps}
        finally:
            c.close()

    def assert_exactly_once(self, keys: Sequence[str]) -> None:
        rows, outputs = self.rows(), self.outputs()
        assert set(rows) == set(keys), (set(keys) - set(rows), set(rows) - set(keys))
        assert all(n == 1 for n in rows.values()), [k for k, n in rows.items() if n > 1]
        assert outputs == rows, "rows and output messages differ"


def pipeline(env: Env, partitions: int = 3) -> Pipeline:
    env.execute("CREATE TABLE invoices (msg_key text PRIMARY KEY, src text NOT NULL)")
    return Pipeline(env, env.topic(partitions=partitions), env.topic(),
                    f"g-{uuid.uuid4().hex[:10]}", partitions)


# -- one test body, both drivers --------------------------------------------------------


@dataclass(frozen=True)
class Sql:
    query: str
    params: tuple[object, ...]


@dataclass(frozen=True)
class Out:
    topic: str
    key: str
    value: bytes


Write = Sql | Out
Plan = Callable[[Sequence[Message]], Sequence[Write]]
"""A handler written once: what a batch writes (it may raise, as a handler does)."""


def apply(tx: Transaction, writes: Sequence[Write]) -> None:
    for w in writes:
        if isinstance(w, Sql):
            tx.execute(w.query, w.params)
        else:
            tx.produce(w.topic, key=w.key, value=w.value)


async def aapply(tx: AsyncTransaction, writes: Sequence[Write]) -> None:
    for w in writes:
        if isinstance(w, Sql):
            await tx.execute(w.query, w.params)
        else:
            tx.produce(w.topic, key=w.key, value=w.value)


class Driver(abc.ABC):
    """The consume path through one kind of coordinator: ``run_consumer`` until a
    condition holds (or the loop raises), and single transactions over a batch."""

    @abc.abstractmethod
    def run_consumer(self, consumer: Consumer, plan: Plan, until: Callable[[], bool],
                     **settings: Any) -> ConsumerStats:
        """``run_consumer`` with ``plan`` as the handler, stopped once ``until()``
        (checked every 0.2 s, for at most 120 s)."""

    @abc.abstractmethod
    def transact(self, consumer: Consumer, batch: Sequence[Message], plan: Plan) -> Status:
        """One transaction consuming ``batch``, its work ``plan(batch)``; raises what
        the transaction raised."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SyncDriver(Driver):
    """Through :class:`Coordinator` (closed with the test's Env)."""

    def __init__(self, env: Env, **config: Any) -> None:
        self.coord = env.coordinator(**config)

    def run_consumer(self, consumer: Consumer, plan: Plan, until: Callable[[], bool],
                     **settings: Any) -> ConsumerStats:
        stop = threading.Event()

        def handle(tx: Transaction, messages: Sequence[Message]) -> None:
            apply(tx, plan(messages))

        def watch() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not stop.is_set() and not until():
                time.sleep(0.2)
            stop.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            return self.coord.run_consumer(consumer, handle, stop=stop, **settings)
        finally:
            stop.set()
            watcher.join()

    def transact(self, consumer: Consumer, batch: Sequence[Message], plan: Plan) -> Status:
        with self.coord.transaction(consumer=consumer, consumed=batch) as tx:
            apply(tx, plan(batch))
        return tx.status

    def close(self) -> None:
        pass  # the test's Env closes its coordinators


class AsyncDriver(Driver):
    """The same through an :class:`AsyncCoordinator`, on an event loop of its own
    (one ``asyncio.Runner`` for the coordinator's whole life)."""

    def __init__(self, env: Env, **config: Any) -> None:
        self.runner = asyncio.Runner()
        self.acoord = AsyncCoordinator(env.dsn, env.kafka, env.name, instance=env.instance,
                                       config=env.config(**config))
        try:
            self.runner.run(self.acoord.open())
        except BaseException:
            self.runner.close()
            raise

    def run_consumer(self, consumer: Consumer, plan: Plan, until: Callable[[], bool],
                     **settings: Any) -> ConsumerStats:
        async def handle(tx: AsyncTransaction, messages: Sequence[Message]) -> None:
            await aapply(tx, plan(messages))

        async def watch(stop: asyncio.Event) -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not await asyncio.to_thread(until):
                await asyncio.sleep(0.2)
            stop.set()

        async def main() -> ConsumerStats:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            try:
                return await self.acoord.run_consumer(consumer, handle, stop=stop, **settings)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

        return self.runner.run(main())

    def transact(self, consumer: Consumer, batch: Sequence[Message], plan: Plan) -> Status:
        async def main() -> Status:
            async with self.acoord.transaction(consumer=consumer, consumed=batch) as tx:
                await aapply(tx, plan(batch))
            return tx.status

        return self.runner.run(main())

    def close(self) -> None:
        try:
            self.runner.run(self.acoord.close())
        finally:
            self.runner.close()


DRIVERS = ("sync", "async")


@contextlib.contextmanager
def open_driver(kind: str, env: Env, **config: Any) -> Iterator[Driver]:
    """A :class:`Driver` of ``kind`` (one of :data:`DRIVERS`) over an open coordinator
    configured with ``config`` (as ``Env.coordinator``)."""
    driver = AsyncDriver(env, **config) if kind == "async" else SyncDriver(env, **config)
    try:
        yield driver
    finally:
        driver.close()
