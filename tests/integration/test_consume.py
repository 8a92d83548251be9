"""The consume path against the real stack: a batch's offsets commit in the same Kafka
transaction as its messages and decision record; every input message gives exactly one
row and one output message, whatever fails; poison messages go to the dead-letter topic
(or stop the loop); recovery's decision moves the offsets or not, with the rest."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

import recovery
from coordinator import (
    AsyncCoordinator,
    AsyncTransaction,
    ConsumerStats,
    Coordinator,
    GroupCommit,
    PoisonMessage,
    RolledBack,
    Status,
    Step,
    Transaction,
)
from recovery import RecoveryConfig
from tests.integration.consume import (
    DRIVERS,
    AsyncDriver,
    Pipeline,
    Write,
    aapply,
    open_driver,
    pipeline,
)
from tests.integration.safety import Crash

if TYPE_CHECKING:
    from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def consume_n(consumer: Consumer, n: int, timeout: float = 30.0) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in consumer.consume(n - len(out), 0.5) if m.error() is None]
    assert len(out) == n, f"consumed {len(out)} of {n}"
    return out


def run_until(coord: Coordinator, p: Pipeline, consumer: Consumer, done: int,
              **kwargs: object) -> threading.Thread:
    """run_consumer in a thread until ``done`` rows exist (then stop)."""
    stop = threading.Event()

    def handle(tx: Transaction, messages: Sequence[Message]) -> None:
        p.handle(tx, messages)

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(p.rows().values()) < done:
            time.sleep(0.2)
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    coord.run_consumer(consumer, kwargs.pop("handle", handle), stop=stop,  # type: ignore[arg-type]
                       batch_timeout=0.2, **kwargs)  # type: ignore[arg-type]
    return watcher


@pytest.fixture(params=DRIVERS)
def consume_driver(request: pytest.FixtureRequest) -> str:
    """Both drivers of the consume path: ``Coordinator`` and ``AsyncCoordinator``."""
    kind: str = request.param
    return kind


def rows_at_least(p: Pipeline, n: int) -> Callable[[], bool]:
    return lambda: sum(p.rows().values()) >= n


def test_a_batch_commits_its_offsets_with_the_transaction(env: Env, consume_driver: str) -> None:
    p = pipeline(env)
    keys = p.feed(30)
    consumer = p.consumer()
    try:
        with open_driver(consume_driver, env) as d:
            batch = consume_n(consumer, 30)
            assert d.transact(consumer, batch, p.plan) is Status.COMMITTED
        assert p.committed() == {0: 10, 1: 10, 2: 10}
    finally:
        consumer.close()
    p.assert_exactly_once(keys)


def test_a_rolled_back_batch_is_delivered_again(env: Env, consume_driver: str) -> None:
    p = pipeline(env, partitions=1)
    p.feed(5)
    consumer = p.consumer()

    def failing(messages: Sequence[Message]) -> list[Write]:
        p.plan(messages)
        raise RuntimeError("the handler failed")

    try:
        with open_driver(consume_driver, env) as d:
            batch = consume_n(consumer, 5)
            with pytest.raises(RuntimeError):
                d.transact(consumer, batch, failing)
            again = consume_n(consumer, 5)
            assert [m.offset() for m in again] == [m.offset() for m in batch]
            d.transact(consumer, again, p.plan)
    finally:
        consumer.close()
    assert p.committed() == {0: 5}
    p.assert_exactly_once([f"m-{i}" for i in range(5)])


def test_run_consumer_exactly_once(env: Env, group_commit: GroupCommit | None,
                                   consume_driver: str) -> None:
    p = pipeline(env)
    keys = p.feed(300)
    consumer = p.consumer()
    try:
        with open_driver(consume_driver, env, group_commit=group_commit) as d:
            stats = d.run_consumer(consumer, p.plan, rows_at_least(p, 300), batch_size=40,
                                   batch_timeout=0.2)
    finally:
        consumer.close()
    p.assert_exactly_once(keys)
    assert p.committed() == {0: 100, 1: 100, 2: 100}
    assert stats.messages == 300 and stats.dead_lettered == 0


def test_poison_message_goes_to_the_dead_letter_topic(env: Env, consume_driver: str) -> None:
    p = pipeline(env)
    keys = p.feed(60)
    dlq = env.topic()
    consumer = p.consumer()
    poison = "m-17"

    def plan(messages: Sequence[Message]) -> list[Write]:
        if any(m.key() == poison.encode() for m in messages):
            raise ValueError("cannot bill this one")
        return p.plan(messages)

    try:
        with open_driver(consume_driver, env) as d:
            stats = d.run_consumer(consumer, plan, rows_at_least(p, 59), batch_size=20,
                                   batch_timeout=0.2, max_attempts=3, dead_letter_topic=dlq)
    finally:
        consumer.close()
    p.assert_exactly_once([k for k in keys if k != poison])
    dead = env.read(dlq)
    assert [(r.key, r.value) for r in dead] == [(poison.encode(), poison.encode())]
    headers = dict(dead[0].headers)
    assert headers["pk2pc.dlq.topic"] == p.source.encode()
    assert headers["pk2pc.dlq.offset"] == b"5"  # m-17 is the 6th message of partition 2
    assert b"cannot bill this one" in (headers["pk2pc.dlq.error"] or b"")
    assert p.committed() == {0: 20, 1: 20, 2: 20}
    assert stats.dead_lettered == 1 and stats.handler_failures >= 3


def test_a_lost_postgres_connection_is_not_the_handlers_failure(
        env: Env, consume_driver: str) -> None:
    """A connection error inside the handler is an outage, not a poison message: the
    batch is consumed again, nothing is dead-lettered."""
    import psycopg

    p = pipeline(env, partitions=1)
    keys = p.feed(10)
    dlq = env.topic()
    consumer = p.consumer()
    failures = [psycopg.OperationalError("server closed the connection unexpectedly")] * 3

    def plan(messages: Sequence[Message]) -> list[Write]:
        if failures:
            raise failures.pop()
        return p.plan(messages)

    try:
        with open_driver(consume_driver, env) as d:
            stats = d.run_consumer(consumer, plan, rows_at_least(p, 10), batch_size=1,
                                   batch_timeout=0.2, max_attempts=2, dead_letter_topic=dlq)
    finally:
        consumer.close()
    p.assert_exactly_once(keys)
    assert env.read(dlq) == []
    assert (stats.retries, stats.handler_failures) == (3, 0)


def test_poison_message_without_dead_letter_topic_stops_the_loop(env: Env,
                                                                 consume_driver: str) -> None:
    p = pipeline(env, partitions=1)
    p.feed(10)
    consumer = p.consumer()

    def plan(messages: Sequence[Message]) -> list[Write]:
        if any(m.key() == b"m-6" for m in messages):
            raise ValueError("poison")
        return p.plan(messages)

    try:
        with open_driver(consume_driver, env) as d, pytest.raises(PoisonMessage) as info:
            d.run_consumer(consumer, plan, lambda: False, batch_size=10, max_attempts=2,
                           batch_timeout=0.5)
    finally:
        consumer.close()
    assert (info.value.partition, info.value.offset) == (0, 6)
    assert p.committed() == {0: 6}  # everything before it committed, nothing skipped
    p.assert_exactly_once([f"m-{i}" for i in range(6)])


@pytest.mark.parametrize("step", [Step.AFTER_PREPARE, Step.AFTER_KAFKA_COMMIT])
def test_recovery_decides_offsets_with_the_rest(env: Env, step: Step) -> None:
    """Recovery rolls back -> the offsets did not move and the batch is redelivered;
    recovery commits -> the offsets moved."""
    p = pipeline(env, partitions=1)
    keys = p.feed(8)

    def on_step(at: Step, gid: str | None) -> None:
        if at is step:
            raise Crash(gid)

    coord = env.coordinator(on_step=on_step)
    consumer = p.consumer()
    try:
        batch = consume_n(consumer, 8)
        with pytest.raises(Crash), coord.transaction(consumer=consumer,
                                                     consumed=batch) as tx:
            p.handle(tx, batch)
    finally:
        consumer.close()
    env.close()
    report = recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))
    if step is Step.AFTER_PREPARE:
        assert report.rolled_back == [tx.gid]
        assert p.committed() == {0: -1001}  # nothing committed: the batch comes again
        assert p.rows() == {} and p.outputs() == {}
        coord = env.coordinator()
        consumer = p.consumer()
        try:
            run_until(coord, p, consumer, 8)
        finally:
            consumer.close()
    else:
        assert report.committed == [tx.gid]
        assert p.committed() == {0: 8}
    p.assert_exactly_once(keys)


def test_rolled_back_transaction_reports_and_rewinds(env: Env) -> None:
    p = pipeline(env, partitions=1)
    p.feed(3)
    coord = env.coordinator()
    consumer = p.consumer()
    try:
        batch = consume_n(consumer, 3)
        with pytest.raises(RolledBack), coord.transaction(consumer=consumer,
                                                          consumed=batch) as tx:
            tx.produce("no-such-topic-" + p.group, value=b"x")
        assert [m.offset() for m in consume_n(consumer, 3)] == [0, 1, 2]
    finally:
        consumer.close()
    assert p.committed() == {0: -1001}


def test_async_run_consumer_leaves_the_event_loop_free(env: Env) -> None:
    """The consumer's calls run in worker threads: a poll that waits a whole second
    for messages never holds up the event loop (a ticker task keeps its pace)."""
    p = pipeline(env, partitions=1)
    keys = p.feed(20)
    consumer = p.consumer()

    async def main(d: AsyncDriver) -> tuple[ConsumerStats, float]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        lags: list[float] = []

        async def tick() -> None:
            while not stop.is_set():
                started = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - started - 0.01)

        async def watch() -> None:
            while sum((await asyncio.to_thread(p.rows)).values()) < 20:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.5)  # two more polls that find nothing
            stop.set()

        async def handle(tx: AsyncTransaction, messages: Sequence[Message]) -> None:
            await aapply(tx, p.plan(messages))

        tasks = [asyncio.create_task(tick()), asyncio.create_task(watch())]
        stats = await asyncio.wait_for(
            d.acoord.run_consumer(consumer, handle, batch_size=5, batch_timeout=1.0,
                                  stop=stop), 120)
        await asyncio.gather(*tasks)
        return stats, max(lags)

    try:
        with open_driver("async", env) as d:
            assert isinstance(d, AsyncDriver)
            stats, lag = d.runner.run(main(d))
    finally:
        consumer.close()
    p.assert_exactly_once(keys)
    assert stats.messages == 20
    assert lag < 0.5, f"the event loop was held up for {lag:.2f} s"


def lost_reply(armed: threading.Event, lost: threading.Event) -> type[Producer]:
    """A producer whose first ``commit_transaction()`` once ``armed`` is set commits, then
    raises as if the broker's reply were lost: an unknown outcome (``lost`` is set)."""

    class LostReply(Producer):
        def commit_transaction(self, *args: Any) -> None:
            super().commit_transaction(*args)
            if armed.is_set() and not lost.is_set():
                lost.set()
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                                "commit reply lost (a fault of the test)"))

    return LostReply


def test_messages_polled_while_waiting_for_recovery_are_consumed_again(
        env: Env, consume_driver: str) -> None:
    """While ``run_consumer`` waits for recovery after an unknown outcome (its partitions
    paused, the consumer still polled), a rebalance gives it a partition that is not
    paused: the messages those polls return are delivered again after the wait, not
    skipped (a later batch would commit offsets past them)."""
    p = pipeline(env, partitions=2)
    keys = p.feed(8)
    # Another member of the group holds a partition until the run is waiting, then leaves.
    other = p.consumer()
    joined, leave = threading.Event(), threading.Event()
    other.subscribe([p.source], on_assign=lambda _c, _tps: joined.set())

    def hold() -> None:
        while not leave.is_set():
            other.poll(0.2)  # never commits: what it reads stays to be consumed
        other.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assignments: list[int] = []
    armed, lost = threading.Event(), threading.Event()

    def plan(messages: Sequence[Message]) -> list[Write]:
        armed.set()
        return p.plan(messages)

    def decide_when_both_assigned() -> None:
        assert lost.wait(60), "the commit's reply was never lost"
        leave.set()
        deadline = time.monotonic() + 60
        while 2 not in assignments and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # polls of the waiting loop fetch the new partition's messages
        recovery.recover(env.dsn, env.kafka, env.name, RecoveryConfig(grace_seconds=0))

    consumer: Consumer | None = None
    try:
        assert joined.wait(60), "the other member never joined"  # it joins first
        consumer = p.consumer()
        consumer.subscribe([p.source], on_assign=lambda _c, tps: assignments.append(len(tps)))
        decider = threading.Thread(target=decide_when_both_assigned, daemon=True)
        decider.start()
        deadline = time.monotonic() + 90
        with open_driver(consume_driver, env, producers=1,
                         producer_factory=lost_reply(armed, lost)) as d:
            stats = d.run_consumer(consumer, plan, lambda: (
                sum(p.rows().values()) >= len(keys) or time.monotonic() > deadline))
        decider.join(60)
    finally:
        leave.set()
        holder.join(10)
        if consumer is not None:
            consumer.close()
    assert lost.is_set() and 2 in assignments and len(stats.in_doubt) == 1
    p.assert_exactly_once(keys)
    assert p.committed() == {0: 4, 1: 4}


def test_a_cancelled_async_run_consumer_skips_nothing(env: Env) -> None:
    """Cancelled while its consume call holds messages, ``AsyncCoordinator.run_consumer``
    waits for that call, moves the consumer back to the committed offsets and ends
    cancelled: the same consumer, given to ``run_consumer`` again, handles every message
    exactly once."""
    p = pipeline(env, partitions=1)
    assigned = threading.Event()
    consumer = p.consumer()
    consumer.subscribe([p.source], on_assign=lambda _c, _tps: assigned.set())
    keys: list[str] = []

    async def handle(tx: AsyncTransaction, messages: Sequence[Message]) -> None:
        await aapply(tx, p.plan(messages))

    async def main() -> None:
        async with AsyncCoordinator(env.dsn, env.kafka, env.name, instance=env.instance,
                                    config=env.config()) as acoord:
            # A consume call waits its whole batch_timeout for a batch of 500.
            first = asyncio.create_task(acoord.run_consumer(consumer, handle,
                                                            batch_timeout=3.0))
            assert await asyncio.to_thread(assigned.wait, 60), "never assigned"
            keys.extend(await asyncio.to_thread(p.feed, 5))
            await asyncio.sleep(0.5)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            stop = asyncio.Event()

            async def watch() -> None:
                deadline = time.monotonic() + 60
                while (sum((await asyncio.to_thread(p.rows)).values()) < len(keys)
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.2)
                stop.set()

            await asyncio.gather(acoord.run_consumer(consumer, handle, stop=stop), watch())

    try:
        asyncio.run(main())
    finally:
        consumer.close()
    p.assert_exactly_once(keys)
