"""The consume path against the real stack: a batch's offsets commit in the same Kafka
transaction as its messages and decision record; every input message gives exactly one
row and one output message, whatever fails; poison messages go to the dead-letter topic
(or stop the loop); recovery's decision moves the offsets or not, with the rest."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import Consumer, Message

import recovery
from coordinator import (
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
    import time

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
        import time

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
