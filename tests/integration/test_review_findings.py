"""Adversarial review of the asyncio driver, cancellation and SQLAlchemy sessions:
each test is an interleaving or an input that once broke atomicity, reported a
wrong outcome or leaked a pooled connection, against the real PostgreSQL and
Kafka.

Cancellation is made to land at one await with a psycopg cursor class set on the
pool's connections (``cursor_factory``, a psycopg seam): it holds one statement of the
driver back until the test lets it go, so the task is cancelled while that
statement is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Generator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from sqlalchemy.exc import IntegrityError

from coordinator import (
    AsyncCoordinator,
    Coordinator,
    Error,
    RolledBack,
    Status,
    Step,
    UsageError,
)
from tests.integration.conftest import Env
from tests.integration.orm import Customer

BOTH_DRIVERS = True


# -- helpers -------------------------------------------------------------------


def make_orders(env: Env) -> None:
    env.execute("CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL)")


def idle_in_transaction(env: Env) -> int:
    """Sessions of the test's database left idle inside a transaction."""
    rows = env.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                       "state LIKE 'idle in transaction%%'", (env.dbname,))
    return int(rows[0][0])


class Gate:
    """Holds the driver's next ``statement`` back until ``released`` is set (with
    ``after``: once PostgreSQL has answered it)."""

    def __init__(self, statement: str, after: bool = False) -> None:
        self.statement = statement
        self.after = after
        self.armed = False
        self.reached = asyncio.Event()
        self.released = asyncio.Event()

    def matches(self, query: Any) -> bool:
        text = query if isinstance(query, str) else query.as_string(None)
        return self.armed and text.startswith(self.statement)

    def cursor_class(self) -> type[psycopg.AsyncCursor[Any]]:
        gate = self

        class GatedCursor(psycopg.AsyncCursor[Any]):
            async def execute(self, query: Any, params: Any = None,
                              **kwargs: Any) -> GatedCursor:
                if gate.matches(query):
                    gate.armed = False
                    if gate.after:
                        await super().execute(query, params, **kwargs)
                    gate.reached.set()
                    await gate.released.wait()
                    if gate.after:
                        return self
                await super().execute(query, params, **kwargs)
                return self

        return GatedCursor


def gated_pool(env: Env, gate: Gate, size: int = 1) -> AsyncConnectionPool[Any]:
    cursor_class = gate.cursor_class()

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        conn.cursor_factory = cursor_class

    return AsyncConnectionPool(env.dsn, min_size=size, max_size=size, open=False,
                               configure=configure)


def cursor_pool(env: Env, cursor_class: type[psycopg.Cursor[Any]],
                **options: Any) -> ConnectionPool[Any]:
    """A pool of two connections (one becomes the instance lock's session) whose
    connections use ``cursor_class``."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.cursor_factory = cursor_class

    return ConnectionPool(env.dsn, min_size=2, max_size=2, configure=configure, **options)


def acoordinator(env: Env, postgres: Any, **overrides: Any) -> AsyncCoordinator:
    overrides.setdefault("connection_timeout", 5.0)
    return AsyncCoordinator(postgres, env.kafka, env.name, instance=env.instance,
                            config=env.config(**overrides))


async def commit_one(coord: AsyncCoordinator, topic: str, i: int) -> Status:
    async with coord.transaction() as tx:
        await tx.execute("INSERT INTO orders (id, total) VALUES (%s, %s)", (i, i))
        tx.produce(topic, value=str(i).encode())
    return tx.status


# -- SQLAlchemy: a flush that fails inside the block ------------------------------


def test_sql_after_a_caught_flush_error_is_not_committed_alone(env: Env,
                                                               engine: Any) -> None:
    """The ORM's usual pattern -- catch the IntegrityError of a flush and go on --
    must not commit anything outside the coordinated transaction. SQLAlchemy rolls
    the joined transaction back when a flush fails; the statements after it must
    not run in autocommit mode (they were committed on the spot, without their
    messages)."""
    env.execute("INSERT INTO customers (id, email) VALUES (1, 'taken@example.com')")
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    tx = coord.transaction()
    with pytest.raises(Error), tx:
        tx.session.add(Customer(id=2, email="taken@example.com"))
        with contextlib.suppress(IntegrityError):  # "already there: carry on"
            tx.session.flush()
        tx.execute("INSERT INTO customers (id, email) VALUES (3, 'c@example.com')")
        tx.produce(topic, value=b"customer 3")
    assert tx.status is Status.ROLLED_BACK
    assert env.execute("SELECT id FROM customers ORDER BY id") == [(1,)]
    assert env.read(topic) == []
    assert env.prepared() == []


def test_orm_writes_after_session_rollback_are_not_committed_alone(env: Env,
                                                                   engine: Any) -> None:
    """``session.rollback()`` inside the block (after a failed flush, as SQLAlchemy
    requires) ends the coordinator's transaction; the session's later writes must
    not be committed on their own."""
    env.execute("INSERT INTO customers (id, email) VALUES (1, 'taken@example.com')")
    topic = env.topic()
    coord = env.coordinator(postgres=engine)
    tx = coord.transaction()
    with pytest.raises(UsageError, match="ended the PostgreSQL transaction"), tx:
        tx.session.add(Customer(id=2, email="taken@example.com"))
        try:
            tx.session.flush()
        except IntegrityError:
            tx.session.rollback()
        tx.session.add(Customer(id=4, email="d@example.com"))
        tx.session.flush()
        tx.produce(topic, value=b"customer 4")
    assert env.execute("SELECT id FROM customers ORDER BY id") == [(1,)]
    assert env.read(topic) == []


# -- a coordinator closed while a transaction is in its block --------------------


@pytest.mark.sync_only
def test_closing_the_coordinator_mid_block_gives_the_connection_back(env: Env) -> None:
    """The coordinator is closed while a transaction is inside its block: the
    transaction fails, but its PostgreSQL work is rolled back and its connection
    goes back to the (borrowed) pool it came from, not left idle in a transaction
    holding its locks."""
    make_orders(env)
    topic = env.topic()
    with ConnectionPool(env.dsn, min_size=2, max_size=2) as pool:
        coord = Coordinator(pool, env.kafka, env.name, instance=env.instance,
                            config=env.config(connection_timeout=5.0))
        coord.open()
        tx = coord.transaction()
        with pytest.raises(Error), tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            tx.produce(topic, value=b"1")
            coord.close()
        assert idle_in_transaction(env) == 0
        assert pool.get_stats()["pool_available"] == 2
        assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.read(topic) == [] and env.prepared() == []


@pytest.mark.sync_only
def test_async_closing_the_coordinator_mid_block_gives_the_connection_back(env: Env) -> None:
    make_orders(env)
    topic = env.topic()

    async def main() -> None:
        async with AsyncConnectionPool(env.dsn, min_size=1, max_size=1, open=False) as pool:
            coord = acoordinator(env, pool)
            await coord.open()
            tx = coord.transaction()
            with pytest.raises(Error):
                async with tx:
                    await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                    tx.produce(topic, value=b"1")
                    await coord.close()
            assert idle_in_transaction(env) == 0
            assert pool.get_stats()["pool_available"] == 1
            assert tx.status is Status.ROLLED_BACK

    asyncio.run(main())
    assert env.ids() == [] and env.read(topic) == [] and env.prepared() == []


# -- asyncio: cancellation at the awaits outside the shielded commit procedure -----


@pytest.mark.sync_only
@pytest.mark.parametrize("block_cancelled", [False, True],
                         ids=["block-raised", "block-cancelled"])
def test_cancelled_during_the_rollback_of_a_failed_block(env: Env,
                                                         block_cancelled: bool) -> None:
    """The block failed (it raised, or its task was cancelled) and the task is
    cancelled (again) while the ROLLBACK is in flight: the rollback still ends and
    the pool's only connection comes back."""
    make_orders(env)
    topic = env.topic()
    gate = Gate("ROLLBACK")

    async def main() -> None:
        async with gated_pool(env, gate) as pool, acoordinator(env, pool) as coord:
            inside = asyncio.Event()

            async def work() -> None:
                async with coord.transaction() as tx:
                    await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                    tx.produce(topic, value=b"1")
                    gate.armed = True
                    if not block_cancelled:
                        raise ValueError("the block fails")
                    inside.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(work())
            if block_cancelled:
                await inside.wait()
                task.cancel()
            await gate.reached.wait()
            task.cancel()
            await asyncio.sleep(0.1)
            gate.released.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await commit_one(coord, topic, 2) is Status.COMMITTED

    asyncio.run(main())
    assert env.ids() == [2]
    assert [m.value for m in env.read(topic)] == [b"2"]


@pytest.mark.sync_only
def test_cancelled_during_begin(env: Env) -> None:
    """A task cancelled while ``async with coord.transaction()`` sends BEGIN: the
    connection it took goes back to the pool."""
    make_orders(env)
    topic = env.topic()
    gate = Gate("BEGIN")

    async def main() -> None:
        async with gated_pool(env, gate) as pool, acoordinator(env, pool) as coord:
            gate.armed = True
            task = asyncio.create_task(commit_one(coord, topic, 1))
            await gate.reached.wait()
            task.cancel()
            await asyncio.sleep(0.1)
            gate.released.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await commit_one(coord, topic, 2) is Status.COMMITTED

    asyncio.run(main())
    assert env.ids() == [2]


# -- asyncio: a cancellation turned into the typed error ---------------------------


@pytest.mark.sync_only
def test_a_cancelled_retry_loop_stops(env: Env) -> None:
    """The documented reaction to ``RolledBack`` is to retry. A worker retrying so,
    cancelled while its commit procedure runs (and then rolls back), must stop:
    the cancellation must not be consumed by the typed error."""
    make_orders(env)
    reached = threading.Event()
    release = threading.Event()

    def on_step(at: Step, gid: str | None) -> None:
        if at is Step.BEFORE_PREPARE:
            reached.set()
            release.wait(30)

    async def main() -> int:
        attempts = 0
        async with acoordinator(env, env.dsn, on_step=on_step, check_topics=False,
                                kafka_timeout=5.0) as coord:

            async def worker() -> None:
                nonlocal attempts
                for _ in range(3):
                    attempts += 1
                    with contextlib.suppress(RolledBack):  # "fix and retry"
                        await commit_one(coord, "no-such-topic-" + env.name, attempts)
                        return

            task = asyncio.create_task(worker())
            await asyncio.to_thread(reached.wait, 30)
            task.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        return attempts

    assert asyncio.run(main()) == 1


# -- asyncio: a task that uses the transaction after its block ended ---------------


@pytest.mark.sync_only
def test_the_transaction_refuses_statements_once_its_block_ended(env: Env) -> None:
    """A task started inside the block runs a statement on the transaction after the
    block ended, while the commit procedure runs (here: right after PREPARE). The
    connection is then idle in autocommit mode: the statement was committed on its
    own, and stayed when the transaction rolled back (its message is too large)."""
    make_orders(env)
    topic = env.topic()
    gate = Gate("SELECT pg_current_xact_id()", after=True)  # the PREPARE round trip

    late_result: list[BaseException | None] = []

    async def main() -> None:
        async with gated_pool(env, gate) as pool, acoordinator(env, pool) as coord:

            async def late(tx: Any) -> None:
                await gate.reached.wait()
                try:
                    await tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
                except UsageError as exc:
                    late_result.append(exc)
                else:
                    late_result.append(None)
                gate.released.set()

            tx = coord.transaction()
            with pytest.raises(RolledBack):
                async with tx:
                    await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                    tx.produce(topic, value=b"x" * 2_000_000)  # refused by Kafka
                    gate.armed = True
                    sibling = asyncio.create_task(late(tx))
            await sibling

    asyncio.run(main())
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == []
    assert isinstance(late_result[0], UsageError)


# -- threads: a statement from another thread while the block ends --------------


@pytest.mark.sync_only
def test_a_statement_from_another_thread_runs_inside_the_transaction_or_not_at_all(
        env: Env) -> None:
    """A thread inside ``tx.execute`` -- past the "block still open" check, not yet
    holding psycopg's connection lock -- while the block ends. Its statement must
    run inside the transaction (and roll back with it: the message is too large)
    or be refused; it ran after PREPARE, in autocommit mode, and was committed on
    its own. A psycopg cursor class holds the thread in that window."""
    make_orders(env)
    topic = env.topic()
    in_window = threading.Event()
    release = threading.Event()

    class HeldCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> HeldCursor:
            if isinstance(query, str) and query.endswith("(2, 2)"):
                in_window.set()
                release.wait(30)
            super().execute(query, params, **kwargs)
            return self

    late: list[BaseException | None] = []
    done = threading.Event()

    def on_step(step: Step, gid: Any) -> None:
        if step is Step.AFTER_PREPARE:  # the window the thread must not reach
            release.set()
            done.wait(30)

    def other_thread(tx: Any) -> None:
        try:
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        except BaseException as exc:  # reported to the test
            late.append(exc)
        else:
            late.append(None)
        done.set()

    with cursor_pool(env, HeldCursor) as pool:
        coord = env.coordinator(postgres=pool, on_step=on_step)
        tx = coord.transaction()
        with pytest.raises(RolledBack), tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            tx.produce(topic, value=b"x" * 2_000_000)  # refused by Kafka
            worker = threading.Thread(target=other_thread, args=(tx,))
            worker.start()
            assert in_window.wait(30)
            # Let the thread go right after PREPARE, or -- where the end of the
            # block waits for it -- after a while.
            threading.Timer(1.0, release.set).start()
        worker.join(30)
        coord.close()
    assert late == [None]  # it ran, inside the transaction
    assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == []


@pytest.mark.sync_only
def test_an_interrupt_while_the_block_end_waits_for_another_thread_rolls_back(
        env: Env) -> None:
    """Ctrl-C (SIGINT in the main thread) while the block's end waits for a statement
    another thread has in flight: the transaction must still roll back and give its
    connection back (the interrupt came before the exit procedure had started, and
    skipped it: the session stayed idle in transaction, its connection out of the
    pool, and the transaction took statements after its block)."""
    assert threading.current_thread() is threading.main_thread()
    make_orders(env)
    topic = env.topic()
    in_flight = threading.Event()

    cancelled: list[BaseException] = []

    def other_thread(tx: Any) -> None:
        in_flight.set()
        try:
            tx.execute("SELECT pg_sleep(1.5)")
        except psycopg.errors.QueryCanceled as exc:  # by the interrupt's rollback
            cancelled.append(exc)

    with ConnectionPool(env.dsn, min_size=2, max_size=2) as pool:  # one: the lock's
        coord = env.coordinator(postgres=pool)
        tx = coord.transaction()
        worker = threading.Thread(target=other_thread, args=(tx,))
        with pytest.raises(KeyboardInterrupt), tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            tx.produce(topic, value=b"one")
            worker.start()
            assert in_flight.wait(10)
            # The main thread waits for the statement by then (it runs for 1.5 s).
            threading.Timer(0.5, _interrupt_main_thread).start()
        worker.join(10)
        assert tx.status is Status.ROLLED_BACK and len(cancelled) == 1
        with pytest.raises(UsageError):
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        pool.getconn(timeout=5).close()  # the transaction's connection is back
        assert idle_in_transaction(env) == 0
        coord.close()
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == []


@pytest.mark.sync_only
@pytest.mark.parametrize("main_message", [False, True], ids=["one-phase", "two-phase"])
def test_a_message_staged_from_another_thread_is_published_or_refused(
        env: Env, main_message: bool) -> None:
    """A thread's ``produce()`` that passed the "block still open" check while the
    block ends (held there by a slow headers iterable): it returned normally, its row
    committed, and its message was left out -- the one-phase check or the Kafka
    transaction had already read the staged messages."""
    make_orders(env)
    topic = env.topic()
    coord = env.coordinator()
    tx = coord.transaction()
    in_window = threading.Event()
    outcome: list[BaseException | None] = []

    def slow_headers() -> Any:
        in_window.set()
        time.sleep(1.0)
        yield ("h", b"v")

    def other_thread() -> None:
        try:
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
            tx.produce(topic, value=b"two", headers=slow_headers())
        except BaseException as exc:  # reported to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=other_thread)
    with tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        if main_message:
            tx.produce(topic, value=b"one")
        worker.start()
        assert in_window.wait(10)
    worker.join(10)
    assert tx.status is Status.COMMITTED
    assert outcome == [None]  # staged before the block's end went on
    assert env.ids() == [1, 2]
    assert sorted(r.value or b"" for r in env.read(topic)) == [b"one", b"two"][not main_message:]


@pytest.mark.sync_only
def test_a_cursor_class_may_run_a_statement_through_the_transaction(env: Env) -> None:
    """A psycopg cursor class that writes an audit row through ``tx.execute`` before
    each INSERT (re-entering ``tx.execute`` in the same thread) must not deadlock."""
    make_orders(env)
    env.execute("CREATE TABLE audit (id int NOT NULL)")
    topic = env.topic()
    current: list[Any] = []

    class AuditCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> AuditCursor:
            if current and isinstance(query, str) and query.startswith("INSERT INTO orders"):
                current[0].execute("INSERT INTO audit (id) VALUES (1)")
            super().execute(query, params, **kwargs)
            return self

    with cursor_pool(env, AuditCursor) as pool:
        coord = env.coordinator(postgres=pool)
        tx = coord.transaction()
        done = threading.Event()

        def block() -> None:
            with tx:
                current.append(tx)
                tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                tx.produce(topic, value=b"one")
            done.set()

        runner = threading.Thread(target=block, daemon=True)  # a deadlock stays here
        runner.start()
        assert done.wait(30), "tx.execute deadlocked when re-entered"
        coord.close()
    assert tx.status is Status.COMMITTED
    assert env.execute("SELECT id FROM audit") == [(1,)]
    assert env.ids() == [1]


def test_closing_the_coordinator_mid_block_rolls_back_without_messages(env: Env) -> None:
    """The coordinator closed while a block without messages is open: nothing may
    commit (the one-phase COMMIT went ahead)."""
    make_orders(env)

    async def close_async(coord: Any) -> None:
        async with coord.transaction() as tx:
            await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            await coord.close()

    if env.driver == "async":
        async def main() -> None:
            async with acoordinator(env, env.dsn) as coord:
                with pytest.raises(UsageError):
                    await close_async(coord)
        asyncio.run(main())
    else:
        coord = env.coordinator()
        tx = coord.transaction()
        with pytest.raises(UsageError), tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            coord.close()
        assert tx.status is Status.ROLLED_BACK
    assert env.ids() == [] and env.prepared() == []
    assert idle_in_transaction(env) == 0


@pytest.mark.sync_only
def test_async_a_statement_of_another_task_in_flight_at_the_block_end(env: Env) -> None:
    """Another task's ``tx.execute`` still running when the block ends: the commit
    must wait for its answer (it read the connection's state while the statement ran,
    and rolled everything back with a UsageError about commit()/rollback())."""
    make_orders(env)
    topic = env.topic()

    async def main() -> tuple[Status, Any]:
        async with acoordinator(env, env.dsn) as coord:
            tx = coord.transaction()
            async with tx:
                await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                tx.produce(topic, value=b"one")
                other = asyncio.create_task(
                    tx.execute("INSERT INTO orders SELECT 2, 2 FROM pg_sleep(0.5)"))
                await asyncio.sleep(0.1)  # its statement is in flight
            await other
            return tx.status, other.exception()

    status, other_error = asyncio.run(main())
    assert status is Status.COMMITTED and other_error is None
    assert env.ids() == [1, 2]
    assert [r.value for r in env.read(topic)] == [b"one"]


# -- threads: interrupts while other threads' statements are in flight ------------


def _interrupt_main_thread() -> None:
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


@pytest.mark.sync_only
def test_after_an_interrupt_no_statement_of_another_thread_runs_on_the_given_back_connection(
        env: Env) -> None:
    """Ctrl-C while the block's end waits for a thread whose ``tx.execute`` passed its
    check but has not reached psycopg yet (its cursor class does some work first).
    The rollback gave the connection back before that thread was done: its INSERT
    then ran on the pooled connection, outside the rolled-back transaction, and the
    pool's next user committed it."""
    assert threading.current_thread() is threading.main_thread()
    make_orders(env)
    topic = env.topic()
    in_cursor = threading.Event()

    class SlowCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> SlowCursor:
            if threading.current_thread().name == "other":
                in_cursor.set()
                time.sleep(1.5)  # a cursor class's own bookkeeping
            super().execute(query, params, **kwargs)
            return self

    errors: list[BaseException] = []

    def other_thread(tx: Any) -> None:
        try:
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    with cursor_pool(env, SlowCursor, kwargs={"autocommit": True}) as pool:
        coord = env.coordinator(postgres=pool)
        tx = coord.transaction()
        worker = threading.Thread(target=other_thread, args=(tx,), name="other")
        with pytest.raises(KeyboardInterrupt), tx:
            tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
            tx.produce(topic, value=b"one")
            worker.start()
            assert in_cursor.wait(10)
            threading.Timer(0.3, _interrupt_main_thread).start()
        worker.join(10)
        assert tx.status is Status.ROLLED_BACK
        for _ in range(2):  # the pool's next users (connection() commits at its end)
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        coord.close()
    assert env.ids() == [] and env.prepared() == []
    assert env.read(topic) == []


class _Ends:
    """An observer that records how each transaction ended."""

    def __init__(self) -> None:
        self.ended: list[Status] = []

    def transaction(self, info: Any) -> Any:
        ends = self.ended

        class Recorder:
            def headers(self) -> tuple[tuple[str, bytes], ...]:
                return ()

            def phase(self, phase: Any, seconds: float) -> None:
                pass

            def prepared(self, gid: str) -> None:
                pass

            def group(self, members: int) -> None:
                pass

            def end(self, status: Status, phase: Any, error: Any, seconds: float) -> None:
                ends.append(status)

        return Recorder()

    def producer_started(self, *args: Any) -> None:
        pass

    def idempotency_hit(self, *args: Any) -> None:
        pass


@pytest.mark.sync_only
def test_a_second_interrupt_during_the_rollback_still_ends_the_transaction(env: Env) -> None:
    """Two Ctrl-C: the first while the block's end waits for another thread's
    statement, the second while the rollback still waits for it (its cursor class
    works 1.5 s before sending it: nothing to cancel yet). The connection was closed
    under the other thread's statement, and observers never heard the end."""
    assert threading.current_thread() is threading.main_thread()
    ends = _Ends()
    outcome: list[Any] = []

    class SlowCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> SlowCursor:
            if threading.current_thread().name == "other":
                time.sleep(1.5)
            super().execute(query, params, **kwargs)
            return self

    def other_thread(tx: Any) -> None:
        try:
            tx.execute("SELECT pg_sleep(0.2)")
            outcome.append("answered")
        except BaseException as exc:  # reported to the test
            outcome.append(exc)

    with cursor_pool(env, SlowCursor) as pool:
        coord = env.coordinator(postgres=pool, observers=(ends,))
        tx = coord.transaction()
        worker = threading.Thread(target=other_thread, args=(tx,), name="other")
        timers = [threading.Timer(delay, _interrupt_main_thread) for delay in (0.3, 0.9)]
        with pytest.raises(KeyboardInterrupt), tx:
            tx.execute("SELECT 1")
            worker.start()
            for timer in timers:
                timer.start()
        worker.join(10)
        for timer in timers:
            timer.join()  # both fired inside the block's end (it waits ~1.7 s)
        assert ends.ended == [Status.ROLLED_BACK]
        # Answered or cancelled, never cut off by a connection closed under it.
        assert outcome == ["answered"] or (
            len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled))
        pool.getconn(timeout=5).close()
        assert idle_in_transaction(env) == 0


@pytest.mark.sync_only
def test_async_a_statement_that_awaits_before_psycopg_is_waited_for(env: Env) -> None:
    """Another task's ``tx.execute`` passed its check, then its cursor class awaits
    before psycopg takes the connection's lock: the block's end found the lock free
    and PREPAREd; the statement then ran on the connection in autocommit mode,
    committed on its own while the transaction was only prepared."""
    make_orders(env)
    topic = env.topic()
    visible_after_prepare: list[int] = []

    class AwaitingCursor(psycopg.AsyncCursor[Any]):
        async def execute(self, query: Any, params: Any = None,
                          **kwargs: Any) -> AwaitingCursor:
            if isinstance(query, str) and query.endswith("(2, 2)"):
                await asyncio.sleep(0.3)  # async bookkeeping of a cursor class
            await super().execute(query, params, **kwargs)
            return self

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        conn.cursor_factory = AwaitingCursor

    def on_step(step: Step, gid: Any) -> None:  # in a worker thread
        if step is Step.AFTER_PREPARE:
            time.sleep(0.5)
            visible_after_prepare.extend(env.ids())

    async def main() -> tuple[Status, Any]:
        async with AsyncConnectionPool(env.dsn, min_size=2, max_size=2, open=False,
                                       configure=configure) as pool, \
                acoordinator(env, pool, on_step=on_step) as coord:
            tx = coord.transaction()
            async with tx:
                await tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
                tx.produce(topic, value=b"one")
                other = asyncio.create_task(
                    tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)"))
                await asyncio.sleep(0.05)  # the other task is past its check
            await asyncio.gather(other, return_exceptions=True)
            return tx.status, other.exception()

    status, other_error = asyncio.run(main())
    assert visible_after_prepare == []
    assert status is Status.COMMITTED and other_error is None
    assert env.ids() == [1, 2]
    assert [r.value for r in env.read(topic)] == [b"one"]


@pytest.mark.sync_only
def test_staging_a_message_while_a_stream_holds_the_connection_does_not_deadlock(
        env: Env) -> None:
    """The block streams rows (psycopg holds the connection's lock throughout) and
    stages a message per row while another thread's ``tx.execute`` waits for that
    lock: ``produce()`` must not wait for the other thread."""
    topic = env.topic()
    coord = env.coordinator()
    tx = coord.transaction()
    done = threading.Event()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            tx.execute("SELECT 1")
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    def block() -> None:
        try:
            with tx:
                worker = threading.Thread(target=other_thread, daemon=True)
                rows = tx.connection.cursor().stream("SELECT generate_series(1, 3)")
                for i, (n,) in enumerate(rows):
                    if i == 0:
                        worker.start()
                        time.sleep(0.5)  # it now waits for the connection's lock
                    tx.produce(topic, value=str(n).encode())
                worker.join(10)
        except BaseException as exc:  # reported to the test
            errors.append(exc)
        done.set()

    threading.Thread(target=block, daemon=True).start()  # a deadlock stays there
    assert done.wait(30), "produce() deadlocked with another thread's tx.execute"
    assert errors == [] and tx.status is Status.COMMITTED
    assert sorted(r.value or b"" for r in env.read(topic)) == [b"1", b"2", b"3"]


@pytest.mark.sync_only
def test_ctrl_c_ends_a_block_whose_stream_blocks_another_thread(env: Env) -> None:
    """The block leaves a ``stream()`` open (psycopg keeps the connection's lock)
    while another thread's ``tx.execute`` waits for that lock: the block's end waits
    for that thread, which can never go on. Ctrl-C must still end it (it waited for
    ever, every further Ctrl-C ignored): the connection is closed under the waiting
    thread, the server rolls back."""
    assert threading.current_thread() is threading.main_thread()
    make_orders(env)
    topic = env.topic()
    errors: list[BaseException] = []

    def other_thread(tx: Any) -> None:
        try:
            tx.execute("INSERT INTO orders (id, total) VALUES (2, 2)")
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    coord = env.coordinator()
    tx = coord.transaction()
    worker = threading.Thread(target=other_thread, args=(tx,), daemon=True)
    timers = [threading.Timer(delay, _interrupt_main_thread) for delay in (0.5, 1.5, 2.5)]
    with pytest.raises(KeyboardInterrupt), tx:
        tx.execute("INSERT INTO orders (id, total) VALUES (1, 1)")
        tx.produce(topic, value=b"one")
        rows: Generator[Any, None, None] = tx.connection.cursor().stream(  # type: ignore[assignment]
            "SELECT generate_series(1, 3)")
        next(rows)  # left open
        worker.start()
        time.sleep(0.3)  # the worker waits for the connection's lock
        for timer in timers:
            timer.start()
    for timer in timers:
        timer.join()  # all fired inside the block's end (it lasts ~5 s)
    rows.close()  # psycopg's lock is free: the waiting thread finds the connection closed
    worker.join(10)
    assert tx.status is Status.ROLLED_BACK
    assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError)
    assert env.ids() == [] and env.prepared() == [] and idle_in_transaction(env) == 0
    assert env.read(topic) == []
