"""What only the asyncio coordinator has: cancellation, a borrowed async pool,
an event loop that never waits on Kafka. Everything else runs against both
coordinators in the shared suite (modules with ``BOTH_DRIVERS = True``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from psycopg_pool import AsyncConnectionPool

from coordinator import AsyncCoordinator, CoordinatorConfig, GroupCommit, Status, Step
from tests.integration.conftest import Env


def make_table(env: Env) -> None:
    env.execute("CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")


def coordinator(env: Env, postgres: Any = None, **overrides: Any) -> AsyncCoordinator:
    return AsyncCoordinator(postgres if postgres is not None else env.dsn, env.kafka,
                            env.name, instance=env.instance, config=env.config(**overrides))


async def insert_and_produce(coord: AsyncCoordinator, topic: str, i: int,
                             inside: Callable[[], Awaitable[None]] | None = None) -> Any:
    tx = coord.transaction()
    async with tx:
        await tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (i, i))
        tx.produce(topic, value=str(i).encode(), key=str(i).encode())
        if inside is not None:
            await inside()
    return tx


def test_borrowed_async_pool_is_not_closed(env: Env) -> None:
    make_table(env)
    topic = env.topic()

    async def main() -> None:
        async with AsyncConnectionPool(env.dsn, min_size=1, max_size=4, open=False) as pool:
            async with coordinator(env, pool) as coord:
                tx = await insert_and_produce(coord, topic, 1)
                assert tx.status is Status.COMMITTED
            assert not pool.closed
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT id FROM orders")
                assert await cur.fetchall() == [(1,)]
                assert conn.autocommit is False  # given back as it was lent

    asyncio.run(main())
    assert [m.value for m in env.read(topic)] == [b"1"]


def test_cancelled_inside_the_block_rolls_back(env: Env) -> None:
    make_table(env)
    topic = env.topic()

    async def main() -> None:
        async with coordinator(env, pool_max_size=2) as coord:
            started = asyncio.Event()

            async def block() -> None:
                started.set()
                await asyncio.sleep(60)

            task = asyncio.create_task(insert_and_produce(coord, topic, 1, block))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Both pooled connections are usable again (none leaked by the cancel).
            for i in (2, 3):
                assert (await insert_and_produce(coord, topic, i)).status is Status.COMMITTED

    asyncio.run(main())
    assert env.ids() == [2, 3]
    assert sorted(m.value or b"" for m in env.read(topic)) == [b"2", b"3"]
    assert env.prepared() == []


@pytest.mark.parametrize("step", [Step.BEFORE_PREPARE, Step.AFTER_PREPARE])
def test_cancelled_during_the_commit_procedure_finishes_it(env: Env, step: Step) -> None:
    """Cancelled while PREPARE or the Kafka commit is under way: the procedure runs to
    its end all the same; the coroutine then raises the CancelledError (it committed)
    and both sides hold the transaction."""
    make_table(env)
    topic = env.topic()
    reached, release = threading.Event(), threading.Event()

    def on_step(at: Step, gid: str | None) -> None:
        if at is step:
            reached.set()
            release.wait(30)

    async def main() -> Any:
        async with coordinator(env, on_step=on_step) as coord:
            holder: list[Any] = []

            async def run() -> None:
                tx = coord.transaction()
                holder.append(tx)
                async with tx:
                    await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                    tx.produce(topic, value=b"1")

            task = asyncio.create_task(run())
            await asyncio.to_thread(reached.wait, 30)
            task.cancel()
            await asyncio.sleep(0.2)
            assert not task.done()  # the procedure is shielded: still running
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            return holder[0]

    tx = asyncio.run(main())
    assert tx.status is Status.COMMITTED
    assert env.ids() == [1]
    assert [m.value for m in env.read(topic)] == [b"1"]
    env.assert_decided(str(tx.gid))
    assert env.prepared() == []


def test_cancelled_procedure_that_rolls_back_carries_the_typed_error(env: Env) -> None:
    """Cancelled during the procedure, which then fails (the topic does not exist):
    the task ends cancelled, as a cancelled task must, with the library's typed
    error as the cause and the outcome in ``tx.status``."""
    from coordinator import RolledBack

    make_table(env)
    reached, release = threading.Event(), threading.Event()

    def on_step(at: Step, gid: str | None) -> None:
        if at is Step.BEFORE_PREPARE:
            reached.set()
            release.wait(30)

    async def main() -> None:
        async with coordinator(env, on_step=on_step, check_topics=False,
                               kafka_timeout=5.0) as coord:
            task = asyncio.create_task(
                insert_and_produce(coord, "no-such-topic-" + env.name, 1))
            await asyncio.to_thread(reached.wait, 30)
            task.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            assert isinstance(info.value.__cause__, RolledBack)
            assert task.cancelled()

    asyncio.run(main())
    assert env.ids() == []
    assert env.prepared() == []


_BLOCKING = ("init_transactions", "begin_transaction", "produce", "flush", "poll",
             "commit_transaction", "abort_transaction", "send_offsets_to_transaction",
             "list_topics")


def recording_producer(calls: list[tuple[str, int]]) -> Callable[[dict[str, Any]], Producer]:
    """A producer factory whose producers record the thread of every blocking call."""

    class Recording(Producer):
        pass

    for method in _BLOCKING:
        def make(name: str) -> Callable[..., Any]:
            base = getattr(Producer, name)

            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                calls.append((name, threading.get_ident()))
                return base(self, *args, **kwargs)
            return call
        setattr(Recording, method, make(method))
    return Recording


def test_the_event_loop_never_waits_on_kafka(env: Env) -> None:
    """256 concurrent transactions with group commit: no blocking Kafka call and
    no step hook ever runs on the event loop's thread (they run in the
    coordinator's worker threads). Checked by thread, not by timing."""
    make_table(env)
    topic = env.topic()
    calls: list[tuple[str, int]] = []
    hooks: list[int] = []

    async def main() -> int:
        async with coordinator(env, group_commit=GroupCommit(), producers=2,
                               pool_max_size=20,
                               producer_factory=recording_producer(calls),
                               on_step=lambda step, gid: hooks.append(threading.get_ident())
                               ) as coord:
            calls.clear()  # start-up runs in a worker thread too, but only runs happen here
            await asyncio.gather(*(insert_and_produce(coord, topic, i) for i in range(256)))
            return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(env.ids()) == 256
    kinds = {name for name, _ in calls}
    assert {"produce", "commit_transaction", "begin_transaction"} <= kinds
    assert hooks, "the step hook was never called"
    on_loop = [name for name, thread in calls if thread == loop_thread]
    assert on_loop == [], f"blocking Kafka calls on the event loop's thread: {on_loop[:5]}"
    assert loop_thread not in hooks


def test_async_config_is_the_same_object(env: Env) -> None:
    coord = coordinator(env)
    assert isinstance(coord.config, CoordinatorConfig)
